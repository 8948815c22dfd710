import os

import pytest

os.environ.setdefault("BRAINMRI_QUIET", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from factory import SHARED_DATA, make_project  # noqa: E402

from brainmri.config import load_params  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def real_ingest(tmp_path_factory):
    """The shared Kaggle dataset ingested and split once per session (about 15 s)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the real dataset is missing at {SHARED_DATA}")
    from tasks.ingest import ingest
    from tasks.split import split

    root = make_project(tmp_path_factory.mktemp("real"), {"ingest": {"source": str(SHARED_DATA)}})
    p = load_params(root / "params.yaml")
    report = ingest(p)
    split_report = split(p)
    return p, report, split_report
