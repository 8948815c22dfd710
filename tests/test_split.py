import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from factory import make_project

from brainmri.config import load_params
from brainmri.core.errors import DataError
from brainmri.intake.decode import decode_file
from brainmri.intake.duplicates import fingerprint, groups_of, joined
from brainmri.intake.parts import SPLITS
from brainmri.intake.splitting import assign_groups, leaked_fraction
from tasks.ingest import ingest
from tasks.split import split


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
    m["sha256"] = [hashlib.sha256(f"{seed}:{p}".encode()).hexdigest() for p in m["source_path"]]
    m["image"] = m["image_id"] + ".png"
    return m


def run_split(tmp_path, manifest, **over):
    """Split `manifest` in the project at `tmp_path`; a ledger left there by an earlier call is read back."""
    root = make_project(tmp_path, over)
    p = load_params(root / "params.yaml")
    p.path("ingest_manifest").parent.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(p.path("ingest_manifest"), index=False)
    report = split(p)
    return pd.read_csv(p.path("split_manifest"), keep_default_na=False), report


def where(out: pd.DataFrame) -> dict[str, str]:
    return dict(zip(out["source_path"], out["split"], strict=True))


def moved(before: dict[str, str], after: dict[str, str]) -> dict[str, tuple[str, str]]:
    return {k: (v, after[k]) for k, v in before.items() if k in after and after[k] != v}


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


def test_earlier_images_keep_their_split_as_data_grows_shrinks_and_returns(tmp_path):
    full = fake_manifest(n_groups=120)
    rng = np.random.default_rng(5)
    first = full[rng.random(len(full)) < 0.6]  # some groups absent, some with only part of their members
    a, _ = run_split(tmp_path, first)
    b, report = run_split(tmp_path, full)
    assert moved(where(a), where(b)) == {}
    assert report["ledger"]["reset"] is None and report["ledger"]["images_moved"] == 0
    assert report["ledger"]["images_kept"] + report["ledger"]["images_new"] == len(b)
    assert report["ledger"]["images_new"] == len(b) - b["group"].isin(set(a["group"])).sum()  # only new groups are placed
    assert (b.groupby("group")["split"].nunique() == 1).all() and report["max_fraction_deviation"] <= 0.03
    shrunk = full.drop(full.index[::3])
    c, _ = run_split(tmp_path, shrunk)
    assert moved(where(b), where(c)) == {}
    d, _ = run_split(tmp_path, full.sample(frac=1, random_state=1))  # the removed images come back where they were
    assert moved(where(b), where(d)) == {} and len(d) == len(b)


def test_ledger_follows_content_not_names(tmp_path):
    m = fake_manifest()
    a, _ = run_split(tmp_path, m)
    renamed = m.assign(source_path="renamed/" + m["source_path"], group="x" + m["group"])
    b, report = run_split(tmp_path, renamed)
    assert report["ledger"]["images_new"] == 0
    assert where(b) == {"renamed/" + k: v for k, v in where(a).items()}


def test_a_bridging_image_merges_a_test_group_into_train_and_every_earlier_test_image_stays_in_test(tmp_path):
    """A new image joins a large train group and a small test group. The ledger once put the merged group where
    most of its images were: the test images moved into train and were trained on. Now a merged group holding an
    earlier test image stays in test, the train images move there, and the report says which and why."""
    m = fake_manifest()
    a, _ = run_split(tmp_path, m)
    yes = a[a["label"] == "yes"]
    sizes = yes.groupby("group").size()
    big = yes[yes["split"] == "train"].groupby("group").size().idxmax()  # joined with a smaller test group
    small = sizes[yes[yes["split"] == "test"].groupby("group").size().index].idxmin()
    assert sizes[big] > sizes[small]
    bridge = m.iloc[[0]].assign(source_path="yes/bridge.jpg", label="yes", group=big, sha256="b" * 64, image_id="f" * 16)
    grown = pd.concat([m.assign(group=m["group"].replace(small, big)), bridge], ignore_index=True)
    b, report = run_split(tmp_path, grown)
    (merge,) = report["ledger"]["merges"]
    was_train = sorted(a.loc[a["group"] == big, "source_path"])
    assert merge["group"] == big and merge["split"] == "test"
    assert sorted(x["source_path"] for x in merge["moved"]) == was_train and {x["from"] for x in merge["moved"]} == {"train"}
    assert moved(where(a), where(b)) == dict.fromkeys(was_train, ("train", "test"))
    earlier_test = set(a.loc[a["split"] == "test", "source_path"])
    assert all(where(b)[sp] == "test" for sp in earlier_test)  # no earlier test image left test
    changes = report["test_changes"]
    assert changes["removed"] == [] and changes["n_now"] == changes["n_before"] + len(was_train) + 1
    why = {c["source_path"]: c["why"] for c in changes["added"]}
    assert why["yes/bridge.jpg"] == "new image, placed in test" and all(why[sp].startswith("moved from train") for sp in was_train)
    p = load_params(tmp_path / "params.yaml")
    history = json.loads(p.path("split_test_history").read_text())
    assert earlier_test | set(was_train) | {"yes/bridge.jpg"} == set(history["ever"].values())


def test_a_label_conflict_that_reaches_a_test_image_is_reported_and_the_history_keeps_it(tmp_path):
    m = fake_manifest()
    a, _ = run_split(tmp_path, m)
    victim = a[a["split"] == "test"].iloc[0]
    clash = m[m["source_path"] == victim["source_path"]].assign(
        source_path="no/clash.jpg", label="no" if victim["label"] == "yes" else "yes", sha256="c" * 64, image_id="e" * 16
    )
    grown = pd.concat([m, clash], ignore_index=True)
    grown["conflict"] = grown["group"].map(grown.groupby("group")["label"].nunique() > 1)
    b, report = run_split(tmp_path, grown)
    removed = {r["source_path"]: r["why"] for r in report["test_changes"]["removed"]}
    lost = sorted(a.loc[a["group"] == victim["group"], "source_path"])
    assert sorted(removed) == lost and set(removed.values()) == {"in a duplicate group with conflicting labels"}
    history = json.loads(load_params(tmp_path / "params.yaml").path("split_test_history").read_text())
    assert set(lost) <= set(history["ever"].values()) and not set(lost) & set(b["source_path"])


def test_a_changed_seed_splits_afresh_and_a_broken_ledger_is_named(tmp_path):
    m = fake_manifest()
    run_split(tmp_path, m)
    _, report = run_split(tmp_path, m, seed=7)
    assert "seed or fractions changed" in report["ledger"]["reset"] and report["ledger"]["images_kept"] == 0
    p = load_params(tmp_path / "params.yaml")
    ledger = json.loads(p.path("split_ledger").read_text())
    assert ledger["seed"] == 7 and len(ledger["images"]) == len(m) - 2  # every usable image, conflicts left out
    before = p.path("split_manifest").read_bytes()
    p.path("split_ledger").write_text('{"seed": 7, "images": {"ab": {"split": "holdout"}}}')
    with pytest.raises(DataError, match=r"ledger\.json.*unreadable"):
        run_split(tmp_path, m, seed=7)
    assert p.path("split_manifest").read_bytes() == before  # nothing already written is lost


def test_real_set_grows_in_steps_of_ten_percent_and_no_earlier_image_moves(real_ingest, tmp_path):
    """Ingest once (the session's real ingest), then re-detect duplicates on growing subsets, as ingest would."""
    p0, _, _ = real_ingest
    full = pd.read_csv(p0.path("ingest_manifest"), keep_default_na=False)
    src, i = p0.resolve(p0.ingest.source), p0.ingest  # the view ingest fingerprints: decoded, not cropped to the head

    def view(rel):
        return decode_file(src / rel, max_pixels=i.max_pixels, max_side=i.max_side, max_bytes=i.max_file_bytes).image

    prints = [fingerprint(view(s), h, p0.dedupe.hash_size) for s, h in zip(full["source_path"], full["sha256"], strict=True)]
    d = p0.dedupe
    same = joined(prints, d.max_distance, d.min_correlation, d.min_partial_correlation)  # a pair's verdict is the pair's alone

    def regroup(idx):
        return groups_of(full["sha256"].iloc[idx].tolist(), same[np.ix_(idx, idx)])

    assert regroup(np.arange(len(full))) == full["group"].tolist()  # the same groups as ingest found
    order = np.random.default_rng(0).permutation(len(full))
    before: dict[str, str] = {}
    for step in range(1, 11):
        idx = np.sort(order[: round(len(full) * step / 10)])
        sub = full.iloc[idx].assign(group=regroup(idx))
        sub["conflict"] = sub["group"].map(sub.groupby("group")["label"].nunique() > 1)
        out, report = run_split(tmp_path, sub)
        assert report["ledger"]["merges"] == [] and moved(before, where(out)) == {}, step
        if step >= 4:  # from about 100 images on, every class share is within 3 points of its target
            assert report["max_fraction_deviation"] <= 0.03 and report["max_class_share_deviation"] <= 0.03, (step, report)
        before = where(out)
    assert len(before) == 253 and report["ledger"]["images_kept"] > 0.85 * 253


@pytest.mark.parametrize("classes", [("0", "01", "1"), ("False", "True"), ("1.5", "2")])
def test_class_folders_named_like_numbers_stay_their_own_classes(tmp_path, classes):
    """Folders named 0, 01 and 1 (or True/False, 1.5): every stage reads the manifests' labels back as the folder
    names, so no class is misread as a number or merged with another ('01' and '1' both as 1)."""
    from factory import write_dataset

    from brainmri.intake.parts import split_part

    over = {"source": "data/raw/ds", "classes": list(classes), "min_images_per_class": 2}
    over["positive_class"] = classes[-1] if len(classes) == 2 else ""
    p = load_params(make_project(tmp_path / "proj", {"ingest": over}) / "params.yaml")
    write_dataset(p.resolve("data/raw/ds"), n=10, seed=3, classes=classes, size=(96, 112))
    ingest(p)
    report = split(p)
    parts = [split_part(p, s) for s in SPLITS]
    assert sorted(set().union(*(set(part.frame["label"]) for part in parts))) == sorted(classes)
    for part in parts:
        assert (part.y >= 0).all() and list(p.ingest.label_names[i] for i in part.y) == part.frame["label"].tolist()
    assert sum(np.bincount(part.y, minlength=len(classes)) for part in parts).tolist() == [10] * len(classes), report


def test_a_class_the_ledger_keeps_out_of_a_split_is_refused_naming_the_ledger(tmp_path):
    """Each class's test image removed after a first split: the ledger keeps every known image where it was, so
    'no' has no test image though it has five groups; split stops, says why and names the ledger, and writes
    nothing; the ledger deleted, it splits afresh."""
    from factory import write_dataset

    p = load_params(make_project(tmp_path / "proj", {"ingest": {"source": "data/raw/ds", "min_images_per_class": 2}}) / "params.yaml")
    ds = write_dataset(p.resolve("data/raw/ds"), n=6, seed=3, size=(96, 112))
    ingest(p)
    split(p)
    first = pd.read_csv(p.path("split_manifest"), keep_default_na=False)
    for f in first.loc[(first["split"] == "test") & (first["label"] == "no"), "source_path"]:
        (ds / f).unlink()
    ingest(p)
    before = p.path("split_manifest").read_bytes()
    with pytest.raises(DataError) as exc:
        split(p)
    message = str(exc.value)
    assert "'no' has no image in test: the split ledger keeps its 5 known groups elsewhere" in message
    assert str(p.path("split_ledger")) in message and p.path("split_manifest").read_bytes() == before
    p.path("split_ledger").unlink()
    assert all(n > 0 for n in split(p)["counts"]["test"].values())


def test_prediction_tables_read_back_with_the_class_names_as_written(tmp_path):
    """The predictions' label, actual and predicted columns (two classes and N) come back as the folder names, so
    the report's paired AUCs and ROC curves see '01' and '1', 'False' and 'True', as two classes."""
    from brainmri.core.files import read_manifest, write_csv
    from brainmri.intake.parts import Part
    from brainmri.stats import evaluation, multiclass_evaluation

    for names, table in [(("0", "01", "1"), multiclass_evaluation.prediction_table), (("False", "True"), evaluation.prediction_table)]:
        k = len(names)
        frame = pd.DataFrame({"source_path": [f"{c}/x.png" for c in names], "group": [f"{i}" for i in range(k)], "label": list(names)})
        prob = np.eye(k)[::-1] if k > 2 else np.array([0.2, 0.9])
        out = table(Part(frame, [], np.arange(k)), prob, np.arange(k)[::-1], names)
        write_csv(tmp_path / "predictions.csv", out)
        back = read_manifest(tmp_path / "predictions.csv")
        assert back["actual"].tolist() == back["label"].tolist() == list(names) and back["predicted"].tolist() == list(names[::-1])
        assert back["group"].tolist() == frame["group"].tolist()
