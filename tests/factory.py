"""Small images and datasets built in tests: every bad-input case the real world sends."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from brainmri.config import merge
from brainmri.intake.phantoms import phantom

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "brain_tumor_dataset"


def brain(seed: int, tumor: bool = False, size: tuple[int, int] = (64, 72)) -> np.ndarray:
    return phantom(np.random.default_rng(seed), tumor, *size)


def encode(arr_or_img, fmt: str, mode: str | None = None, **kw) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png16(arr8: np.ndarray) -> bytes:
    """A real 16-bit grayscale PNG whose values are the 8-bit ones times 257."""
    return encode(Image.fromarray(arr8.astype(np.uint16) * 257), "PNG")


def rgba_png(arr8: np.ndarray) -> bytes:
    """RGBA whose background is transparent white: composited on black it must come out black."""
    rgba = np.zeros(arr8.shape + (4,), np.uint8)
    rgba[..., :3] = 255
    fg = arr8 > 20
    rgba[fg, :3] = arr8[fg, None]
    rgba[..., 3] = np.where(fg, 255, 0)
    return encode(Image.fromarray(rgba, "RGBA"), "PNG")


def cmyk_jpeg(arr8: np.ndarray) -> bytes:
    return encode(Image.fromarray(arr8).convert("RGB").convert("CMYK"), "JPEG", quality=95)


def truncated_jpeg(arr8: np.ndarray) -> bytes:
    data = encode(arr8, "JPEG", quality=90)
    return data[: len(data) // 2]


def write_dataset(root: Path, n: int = 8, seed: int = 0, classes=("no", "yes"), size=(64, 72)) -> Path:
    """A clean class-folder dataset of JPEG phantoms, `n` per class, tumours in 'yes'."""
    for ci, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = brain(seed * 1000 + ci * 100 + i, tumor=(cls == "yes"), size=size)
            (root / cls / f"{cls} {i}.jpg").write_bytes(encode(arr, "JPEG", quality=92))
    return root


def make_project(root: Path, overrides: dict | None = None, code: bool = False, replace: dict | None = None) -> Path:
    """A project folder with the repository's params.yaml (overrides merged, `replace` sections swapped whole)
    and, if asked, dvc.yaml and the code."""
    root.mkdir(parents=True, exist_ok=True)
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides or {})
    params.update(replace or {})
    if params["promotion"]["model"] not in params["models"]:  # a test's own model set: serve its first model
        params["promotion"]["model"] = next(iter(params["models"]))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "weights").mkdir(exist_ok=True)  # paths.weights_inbox: a dependency of the weights stages
    (root / "subjects").mkdir(exist_ok=True)  # paths.subjects_inbox: a dependency of the ingest stage; with a file in it,
    shutil.copy(REPO / "subjects" / "README.md", root / "subjects" / "README.md")  # as in the repository, a git clone has it
    (root / "external").mkdir(exist_ok=True)  # external.source: no class folder, so no external set
    shutil.copy(REPO / "external" / ".gitkeep", root / "external" / ".gitkeep")
    if code:
        shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
        shutil.copy(REPO / "versions.yaml", root / "versions.yaml")
        shutil.copy(REPO / "requirements.lock", root / "requirements.lock")
        for pkg in ("brainmri", "tasks", "flows"):
            shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def materialise_weights(p) -> None:
    """The weights stage for every backbone the models use (what `dvc repro` runs before train)."""
    from tasks.weights import weights

    for key in sorted({m.backbone for m in p.models.values()}):
        weights(p, key)


def tiny_training(size: int = 32, epochs: int = 3) -> dict:
    """Overrides for every backbone: random weights (tests never download), tiny inputs, few epochs."""
    bb = {"weights": "none", "input_size": size, "epochs": epochs, "patience": 2}
    single = {"feature_layer": "", "learning_rate": 0.0001, "dense": 256, "l2": 0.0}  # one grid point: tests of the grid set their own
    return {
        "backbones": {k: {**bb, **(single if k != "smallcnn" else {})} for k in ("resnet50v2", "vgg19", "vgg16", "smallcnn")},
        "train": {"bootstrap": 50, "cv_folds": 2, "threshold": "youden"},
        "export": {"int8_calibration_images": 8, "reduce_range": True},  # one int8 candidate: tests of the choice set their own
        "benchmark": {"batch_size": 2, "warmup": 1, "repeats": 3, "min_repeats": 3},
    }


def tiny_onnx(path: Path, size: int = 32, shape=None, meta: dict | None = None) -> Path:
    """A brainmri-style ONNX model in a few bytes: probability = mean brightness / 255; metadata as export writes it."""
    import onnx
    from onnx import TensorProto, helper

    shape = shape or ["batch", size, size, 3]
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 255])
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Flatten", ["mean"], ["flat"]),
            helper.make_node("Mul", ["flat", "scale"], ["probability"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        [scale],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    props = {"input_size": size, "threshold": 0.2, "positive_class": "yes", "negative_class": "no"}
    props.update(max_side=512, max_pixels=40_000_000)
    helper.set_model_props(proto, {k: str(v) for k, v in {**props, **(meta or {})}.items()})
    onnx.save(proto, path)
    return path
