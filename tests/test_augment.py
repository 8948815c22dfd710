import numpy as np
import pandas as pd
from factory import brain, make_project, write_dataset
from PIL import Image

from brainmri.config import load_params
from brainmri.intake.augment import apply
from tasks.augment import augment
from tasks.ingest import ingest
from tasks.split import split

IDENTITY = {"rotation": 0.0, "shift_x": 0.0, "shift_y": 0.0, "shear": 0.0, "zoom_x": 1.0, "zoom_y": 1.0, "flip": False, "brightness": 1.0}


def pipeline_until_augment(root, **over):
    make_project(root, {"ingest": {"source": "data/raw/ds", "min_images_per_class": 2}, **over})
    p = load_params(root / "params.yaml")
    write_dataset(p.resolve("data/raw/ds"), n=8)
    ingest(p)
    split(p)
    return p, augment(p)


def test_augments_train_only_k_copies_deterministically(tmp_path):
    p, summary = pipeline_until_augment(tmp_path / "a", augment={"copies": 2})
    sp = pd.read_csv(p.path("split_manifest"), keep_default_na=False)
    m = pd.read_csv(p.path("augment_manifest"), keep_default_na=False)
    train = sp[sp["split"] == "train"]
    assert summary["n_augmented"] == 2 * len(train) == len(m)
    assert set(m["source_path"]) == set(train["source_path"])  # never val or test
    assert (m.groupby("source_path")["copy"].apply(sorted).map(tuple) == (0, 1)).all()
    assert set(m["group"]) <= set(train["group"])
    q, _ = pipeline_until_augment(tmp_path / "b", augment={"copies": 2})
    for name in m["image"]:
        assert (p.path("augment_images") / name).read_bytes() == (q.path("augment_images") / name).read_bytes()
    first = Image.open(p.path("augment_images") / m["image"][0])
    source = Image.open(p.path("ingest_images") / m["source_image"][0])
    assert first.size == source.size and np.asarray(first).tolist() != np.asarray(source).tolist()


def test_zero_copies_writes_an_empty_manifest(tmp_path):
    p, summary = pipeline_until_augment(tmp_path, augment={"copies": 0})
    assert summary["n_augmented"] == 0
    assert pd.read_csv(p.path("augment_manifest")).empty


def test_transforms_do_what_they_say():
    img = Image.fromarray(brain(1)).convert("RGB")
    assert np.array_equal(np.asarray(apply(img, IDENTITY)), np.asarray(img))
    flipped = np.asarray(apply(img, {**IDENTITY, "flip": True}))
    assert np.array_equal(flipped, np.asarray(img)[:, ::-1])
    darker = np.asarray(apply(img, {**IDENTITY, "brightness": 0.5}), dtype=float)
    assert abs(darker.mean() - np.asarray(img).mean() / 2) < 1.0
    shifted = np.asarray(apply(img, {**IDENTITY, "shift_x": 0.25}))
    assert shifted[:, : img.width // 4 - 1].max() == 0  # content moved right, black fill on the left
