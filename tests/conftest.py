import os
import sys

import pandas as pd
import pytest

os.environ.setdefault("BRAINMRI_QUIET", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")  # DVC's usage reports: tests never touch the network
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")  # as every stage runs (brainmri.core.machine.pool_tensorflow_memory)

from factory import SHARED_DATA, make_project  # noqa: E402

from brainmri.config import load_params  # noqa: E402

# the scenario worker's files: test_pipeline.py's shared git + DVC workspace, its tests in file order; and files
# whose fixtures are their own (no session fixture of this file), which even the two workers' loads: with only
# test_faults.py beside test_pipeline.py, --durations on 2 cores summed to 435 s here and 894 s on the other
# worker (2026-12-08), which then ran alone for 8 minutes; these four moved 233 s of it
SCENARIO_FILES = {
    "test_pipeline.py",
    "test_faults.py",
    "test_multiclass_pipeline.py",
    "test_interrupts.py",
    "test_neighbours.py",
    "test_hostile_models.py",
}
# fixtures that train a model, build a shared workspace or run a stage on the real set
HEAVY_FIXTURES = {"small_run", "real_ingest", "trained", "cv_runs", "vgg16_spec", "ws"}


def pytest_itemcollected(item):
    """`heavy` marks every test that needs a heavy fixture: `pytest -m "not slow and not heavy"` is the fast tier."""
    if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
        item.add_marker(pytest.mark.heavy)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: without xdist the tests run in one process, in file order
def pytest_xdist_make_scheduler(config, log):
    """`pytest -n 2 --dist loadscope` (what `make test` runs): SCENARIO_FILES on one worker, every other test
    on the other, each in file order, so each session fixture is built once, by one worker. Also for `load` and
    `worksteal`, which would split test_pipeline.py's shared workspace between workers. Written here because
    xdist's own `loadgroup` silently stops grouping on pytest 9.2 (pytest-dev/pytest-xdist#1386)."""
    if config.getvalue("dist") not in ("load", "loadscope", "worksteal"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class TwoTiers(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "scenario" if nodeid.split("::", 1)[0].rsplit("/", 1)[-1] in SCENARIO_FILES else "units"

    return TwoTiers(config, log)


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


SMALL_MODELS = {
    "vgg16-noaug": {"backbone": "vgg16", "augment": False},
    "vgg16-aug": {"backbone": "vgg16", "augment": True},
    "smallcnn-aug": {"backbone": "smallcnn", "augment": True},
}


# Which stage opened which test image during small_run: a Python audit hook (sys.addaudithook) sees every open() of
# any library that opens files from Python (Pillow, NumPy, Keras's loaders), not only the project's own calls.
TEST_IMAGE_READS: dict = {"stage": None, "test_paths": frozenset(), "reads": {}}


def _record_test_image_reads(event: str, args: tuple) -> None:
    if event == "open" and TEST_IMAGE_READS["stage"] and args and isinstance(args[0], (str, os.PathLike)):
        path = os.path.abspath(os.fspath(args[0]))
        if path in TEST_IMAGE_READS["test_paths"]:
            TEST_IMAGE_READS["reads"].setdefault(TEST_IMAGE_READS["stage"], set()).add(path)


def _stage(name: str, fn, *args):
    """Run one stage function, its opens of test images recorded under `name`."""
    TEST_IMAGE_READS["stage"] = name
    try:
        return fn(*args)
    finally:
        TEST_IMAGE_READS["stage"] = None


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """The whole chain in process on 2 x 16 phantoms at 32 px, three models, every stage; which stage opened a test
    image is recorded (TEST_IMAGE_READS)."""
    from factory import materialise_weights, tiny_training

    from brainmri.intake.phantoms import generate
    from tasks.audit import audit
    from tasks.augment import augment
    from tasks.benchmark import benchmark
    from tasks.ensemble import ensemble
    from tasks.evaluate import evaluate
    from tasks.export import export
    from tasks.external import external
    from tasks.ingest import ingest
    from tasks.ingest_external import ingest_external
    from tasks.report import report
    from tasks.saliency import saliency
    from tasks.split import split
    from tasks.train import train

    over = {**tiny_training(), "ingest": {"source": "data/raw/synthetic", "max_side": 96}, "augment": {"copies": 1}}
    over["ensemble"] = {"members": ["vgg16-noaug", "vgg16-aug"]}  # off by default (params.yaml says why); on here
    over["backbones"]["vgg16"].update(dense=0, linear_c=0.1)  # linear heads (hidden ones: tests/test_pipeline.py), so every
    # stage after train (export, parity, int8, Grad-CAM, the ensemble, the report) runs on the head the grids now choose
    root = make_project(tmp_path_factory.mktemp("small"), over, replace={"models": SMALL_MODELS})
    p = load_params(root / "params.yaml")
    generate(p.resolve("data/raw/synthetic"), {"yes": True, "no": False}, 16, 1, 64, 96, 0.1)
    ingest(p)
    audit(p)
    split(p)
    split_rows = pd.read_csv(p.path("split_manifest"), keep_default_na=False)
    test_files = split_rows.loc[split_rows["split"] == "test", "image"]
    TEST_IMAGE_READS["test_paths"] = frozenset(os.path.abspath(p.path("ingest_images") / f) for f in test_files)
    sys.addaudithook(_record_test_image_reads)
    _stage("augment", augment, p)
    _stage("ingest_external", ingest_external, p)  # external.source holds no class folder: the "no external set" case
    materialise_weights(p)
    trained = {n: _stage("train", train, p, n) for n in p.models}
    for n in p.models:
        _stage("export", export, p, n)
    evaluated = {n: _stage("evaluate", evaluate, p, n) for n in p.models}  # the exported ONNX files, as users deploy them
    for n in p.models:
        _stage("benchmark", benchmark, p, n)
        _stage("external", external, p, n)
    _stage("ensemble", ensemble, p)
    for n in p.models:
        _stage("saliency", saliency, p, n)
    return p, trained, evaluated, _stage("report", report, p)
