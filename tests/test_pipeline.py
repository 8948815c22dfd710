"""Scenario tests: the real pipeline through `dvc repro` and through the Prefect flow, on small phantoms."""

import re
import subprocess

import pandas as pd
import pytest
import yaml
from factory import make_project

from brainmri.config import load_params

pytestmark = pytest.mark.slow

SMALL = {
    "ingest": {"source": "data/raw/synthetic", "max_side": 128},
    "synthetic": {"n_per_class": 12, "min_size": 64, "max_size": 128},
    "augment": {"copies": 1},
}


def sh(cwd, *cmd):
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("dvcproj"), SMALL, code=True)
    sh(root, "brainmri", "synthesize")
    sh(root, "dvc", "init", "--no-scm", "-q")
    return root


def test_dvc_repro_runs_once_then_nothing_then_only_what_changed(dvc_project):
    root = dvc_project
    assert ran(sh(root, "dvc", "repro")) == ["ingest", "split", "augment"]
    assert ran(sh(root, "dvc", "repro")) == []
    assert "up to date" in sh(root, "dvc", "status")
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    outs = {o["path"] for s in lock["stages"].values() for o in s.get("outs", [])}
    assert {"data/split/split.csv", "data/ingest/report.json", "data/augment/manifest.csv"} <= outs

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["augment"]["rotation"] = 5.0
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(sh(root, "dvc", "repro")) == ["augment"]

    params["split"].update(train=0.65, val=0.2)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(sh(root, "dvc", "repro")) == ["split", "augment"]
    assert ran(sh(root, "dvc", "repro")) == []


def test_prefect_flow_matches_dvc_outputs(dvc_project, tmp_path, prefect_harness):
    from flows.pipeline import pipeline

    root = make_project(tmp_path / "flow", SMALL)
    sh(root, "brainmri", "synthesize")
    result = pipeline(str(root / "params.yaml"))
    assert result["ingest"]["n_ingested"] > 24 and result["augment"]["n_augmented"] > 0
    p = load_params(root / "params.yaml")
    flow_split = pd.read_csv(p.path("split_manifest"))
    dvc_p = load_params(dvc_project / "params.yaml", {"split": {"train": 0.7, "val": 0.15}})
    from tasks.split import split

    split(dvc_p)  # the first DVC configuration again, to compare like with like
    assert flow_split.equals(pd.read_csv(dvc_p.path("split_manifest")))
