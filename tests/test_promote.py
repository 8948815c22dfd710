"""The promotion gate: the retrained model is served only if the paired group-bootstrap interval of its val AUC
difference to the served model stays above -margin; test images are never read."""

import numpy as np
import pytest
from factory import make_project, write_dataset

from brainmri.config import load_params
from brainmri.intake.parts import split_part
from flows import promote
from tasks.ingest import ingest
from tasks.split import split


@pytest.fixture(scope="module")
def p(tmp_path_factory):
    root = tmp_path_factory.mktemp("promote")
    write_dataset(root / "data/raw/ph", n=20)
    p = load_params(make_project(root, {"ingest": {"source": "data/raw/ph"}, "promotion": {"bootstrap": 300}}) / "params.yaml")
    ingest(p)
    split(p)
    return p


def scored(monkeypatch, p, by_model: dict):
    """Each model file's val probabilities, as given; any other image set (test) fails the test."""
    val = [str(x) for x in split_part(p, "val").paths]

    def score(p_, onnx_file, paths):
        assert [str(x) for x in paths] == val, "the gate read images other than the validation split"
        return by_model[onnx_file.name]

    monkeypatch.setattr(promote, "score", score)


def test_nothing_served_yet_promotes(p, tmp_path):
    assert promote.decide(p, tmp_path / "new.onnx", None) == {"promote": True, "reason": "no model is served yet"}


def test_a_worse_candidate_is_rejected_and_an_equal_one_promoted(p, monkeypatch, tmp_path):
    y = split_part(p, "val").y
    good = np.where(y == 1, 0.9, 0.1) + np.linspace(0, 0.01, len(y))
    scored(monkeypatch, p, {"served.onnx": good, "worse.onnx": 1 - good, "same.onnx": good.copy()})
    served = tmp_path / "served.onnx"
    served.write_bytes(b"x")
    worse = promote.decide(p, tmp_path / "worse.onnx", served)
    assert not worse["promote"] and worse["val_auc_difference"]["value"] == pytest.approx(-1.0)
    assert worse["n_val"] == len(y) and "at or below -0.05" in worse["reason"]
    same = promote.decide(p, tmp_path / "same.onnx", served)
    assert same["promote"] and same["val_auc_difference"]["ci_low"] == 0.0
    no_margin = load_params(p.root / "params.yaml", {"promotion": {"margin": 0.0, "bootstrap": 300}})
    strict = promote.decide(no_margin, tmp_path / "same.onnx", served)
    assert not strict["promote"]  # with no margin, a model must be better than the served one to replace it
