import numpy as np
import pandas as pd
import pytest
from factory import make_project

from brainmri.config import load_params
from tasks.split import SPLITS, assign_groups, leaked_fraction, split


def fake_manifest(seed=0, n_groups=60):
    """Groups of 1 to 4 images per class, ids unrelated to order, plus one label-conflict group."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        label = "yes" if g % 5 < 3 else "no"
        for k in range(int(rng.integers(1, 5))):
            rows.append({"source_path": f"{label}/img{g:03d}_{k}.jpg", "label": label, "group": f"g{g:04x}", "conflict": False})
    rows += [
        {"source_path": "yes/c.jpg", "label": "yes", "group": "gconf", "conflict": True},
        {"source_path": "no/c.jpg", "label": "no", "group": "gconf", "conflict": True},
    ]
    m = pd.DataFrame(rows)
    m["image_id"] = [f"{i:016x}" for i in range(len(m))]
    m["image"] = m["image_id"] + ".png"
    return m


def run_split(tmp_path, manifest, **over):
    root = make_project(tmp_path, over)
    p = load_params(root / "params.yaml")
    p.path("ingest_manifest").parent.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(p.path("ingest_manifest"), index=False)
    report = split(p)
    return pd.read_csv(p.path("split_manifest"), keep_default_na=False), report


def test_groups_stay_whole_and_classes_are_balanced(tmp_path):
    out, report = run_split(tmp_path, fake_manifest())
    assert (out.groupby("group")["split"].nunique() == 1).all()
    assert "gconf" not in set(out["group"]) and report["excluded_conflicts"] == ["no/c.jpg", "yes/c.jpg"]
    assert set(out["split"]) == set(SPLITS) and report["test_leak"] == 0.0
    assert report["max_class_share_deviation"] < 0.05
    assert list(out.columns[:4]) == ["source_path", "label", "group", "split"]


def test_split_is_independent_of_listing_order_and_follows_the_seed(tmp_path):
    m = fake_manifest()
    a, _ = run_split(tmp_path / "a", m)
    b, _ = run_split(tmp_path / "b", m.sample(frac=1, random_state=3))
    assert a.equals(b)
    c, _ = run_split(tmp_path / "c", m, seed=7)
    assert not a["split"].equals(c["split"])


def test_assignment_hits_targets_per_class():
    groups = pd.DataFrame({"group": [f"g{i}" for i in range(100)], "label": ["a"] * 100, "size": [1] * 100})
    got = pd.Series(assign_groups(groups, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=1)).value_counts()
    assert got.to_dict() == {"train": 70, "val": 15, "test": 15}


def test_leak_measure_sees_a_leak():
    frame = pd.DataFrame({"group": ["a", "a", "b", "c"], "split": ["train", "test", "test", "val"]})
    assert leaked_fraction(frame) == pytest.approx(0.5)


def test_real_dataset_split_leaks_nothing(real_ingest):
    p, _, report = real_ingest
    out = pd.read_csv(p.path("split_manifest"), keep_default_na=False)
    assert len(out) == 253 and report["test_leak"] == 0.0
    assert (out.groupby("group")["split"].nunique() == 1).all()
    overall = (out["label"] == "yes").mean()
    for s in SPLITS:
        share = (out.loc[out["split"] == s, "label"] == "yes").mean()
        assert abs(share - overall) < 0.02, (s, share, overall)
    assert report["naive_split_test_leak"] > 0.1  # the duplicates are real: ignoring them leaks test images
    assert out["source_path"].str.match(r"^(yes|no)/").all() and "no/1 no.jpeg" in set(out["source_path"])
