"""Keras models: a backbone from keras.applications (or the small reference CNN) with its preprocessing built in,
global pooling, and a small head. The frozen part and the head are separate models so features can be cached."""

from __future__ import annotations

import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainmri.config import SMALL_CNN, Backbone, Params
from brainmri.core.errors import ConfigError
from brainmri.core.files import atomic_path
from brainmri.learn.outputs import BINARY_OUTPUT, MULTI_OUTPUT
from brainmri.learn.weights import RECORD, weights_kind

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ log is noise here; Python errors still surface
import keras  # noqa: E402


@dataclass(frozen=True)
class WeightsSource:
    kind: str  # 'imagenet', 'file' or 'none'
    path: str | None = None  # the materialised copy (data/weights/KEY/weights.h5), relative to the workspace
    sha256: str | None = None  # of the weights file's bytes
    origin: str | None = None  # for 'file': the path in params; for 'imagenet': the file Keras downloaded

    def describe(self) -> str:
        if self.kind == "file":
            return f"local weights file {self.origin} (sha256 {self.sha256[:12]}...)"
        if self.kind == "imagenet":
            return f"ImageNet weights from Keras ({self.origin}, sha256 {self.sha256[:12]}...)"
        return "random initialisation (no pretrained weights)"


def application(name: str, key: str):
    """The keras.applications class named `name`; `key` names the params entry in errors."""
    if name == SMALL_CNN:
        return None
    cls = getattr(keras.applications, name, None)
    if cls is None or not callable(cls) or name[0].islower():
        allowed = sorted(n for n in dir(keras.applications) if n[0].isupper())
        raise ConfigError(f"backbones.{key}.application: unknown backbone {name!r}; allowed: {SMALL_CNN}, {', '.join(allowed)}")
    return cls


def weights_source(p: Params, key: str) -> WeightsSource:
    """What the weights stage materialised for backbone `key` (data/weights/KEY/): train reads only that."""
    folder = p.path("weights") / key
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        raise ConfigError(f"backbones.{key}: no weights materialised in {folder}; run `brainmri weights {key}` (dvc repro does)") from None
    if record.get("kind") != weights_kind(p, key):
        raise ConfigError(f"{folder}: holds {record.get('kind')} weights but params ask for {p.backbones[key].weights!r}; run `dvc repro`")
    if record["kind"] == "none":
        return WeightsSource("none")
    path = folder / record["file"]
    return WeightsSource(record["kind"], path.relative_to(p.root).as_posix(), record["sha256"], record["origin"])


def preprocess_layer(app_cls, name: str = "preprocess") -> keras.layers.Layer:
    """The backbone's own preprocess_input as a frozen 1x1 convolution (every Keras mode is per-pixel affine).

    A built-in layer, unlike a Lambda, survives Keras safe-mode loading and ONNX export.
    """
    if app_cls is None:
        weight, bias = np.eye(3) / 255.0, np.zeros(3)  # the reference CNN sees 0-1 inputs
    else:
        fn = sys.modules[app_cls.__module__].preprocess_input
        probe = np.concatenate([np.zeros((1, 1, 1, 3)), 255.0 * np.eye(3).reshape(3, 1, 1, 3)]).astype(np.float32)
        out = np.asarray(fn(probe.copy()), dtype=np.float64).reshape(4, 3)
        bias = out[0]
        weight = ((out[1:] - bias) / 255.0).T  # weight[out_channel, in_channel]
        check = np.random.default_rng(0).uniform(0, 255, (1, 4, 4, 3)).astype(np.float32)
        if not np.allclose(np.asarray(fn(check.copy())), check @ weight.T + bias, atol=1e-3):
            raise ConfigError(f"{app_cls.__name__}: its preprocess_input is not per-pixel affine; it cannot be built into the model")
    layer = keras.layers.Conv2D(3, 1, name=name, trainable=False)
    layer.build((None, None, None, 3))
    layer.set_weights([weight.T.reshape(1, 1, 3, 3).astype(np.float32), bias.astype(np.float32)])
    return layer


def _small_cnn(size: int) -> keras.Model:
    inp = keras.Input((size, size, 3))
    x = inp
    for filters in (16, 32, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.MaxPooling2D()(x)
    return keras.Model(inp, x, name="smallcnn_base")


def load_base(p: Params, key: str, weights_file: Path | None) -> keras.Model:
    """The backbone without its top, whole, with `weights_file` loaded into it (random when None)."""
    bb: Backbone = p.backbones[key]
    cls = application(bb.application, key)
    if cls is None:
        return _small_cnn(bb.input_size)
    try:
        base = cls(include_top=False, weights=None, input_shape=(bb.input_size, bb.input_size, 3))
    except ValueError as exc:
        raise ConfigError(f"backbones.{key}: {bb.application} cannot be built at input_size {bb.input_size}: {exc}") from None
    if weights_file is not None:
        check_weights_file(weights_file, base, f"backbones.{key}.weights: {weights_file} does not fit {bb.application}(include_top=False)")
        try:
            base.load_weights(weights_file)
        except Exception as exc:
            raise ConfigError(f"backbones.{key}.weights: {weights_file} does not fit {bb.application}(include_top=False): {exc}") from None
    return base


MAX_WEIGHTS_OBJECTS = 10_000  # groups and datasets walked in a weights file: VGG16's has 60, ResNet50V2's about 1,300


def check_weights_file(path: Path, model: keras.Model, refusal: str) -> None:
    """Every dataset the HDF5 file declares has a float dtype and the shape of one of `model`'s variables, and together
    they are no larger than the model, checked from the file's headers before any weight is read: a 4 MB file
    declaring a 1.5 GB dataset took 6.7 GB of memory to refuse."""
    import h5py

    shapes = {tuple(v.shape) for v in model.weights}
    budget = 2 * sum(int(np.prod(v.shape)) * 8 for v in model.weights)  # float64 copies of every variable, twice over
    found: list = []

    def visit(name, obj):
        found.append((name, obj.shape, obj.dtype) if isinstance(obj, h5py.Dataset) else None)
        return True if len(found) > MAX_WEIGHTS_OBJECTS else None  # a value other than None stops the walk

    try:
        with h5py.File(path, "r") as f:
            f.visititems(visit)
    except Exception as exc:  # h5py raises OSError, KeyError, ValueError... on a file that is no HDF5
        raise ConfigError(f"{refusal}: not a readable HDF5 weights file ({type(exc).__name__})") from None
    if len(found) > MAX_WEIGHTS_OBJECTS:
        raise ConfigError(f"{refusal}: the file holds over {MAX_WEIGHTS_OBJECTS} groups and datasets")
    datasets = [d for d in found if d is not None]
    for name, shape, dtype in datasets:
        if dtype.kind != "f" or tuple(shape) not in shapes:
            raise ConfigError(f"{refusal}: its dataset {name[:120]} ({dtype}, shape {shape}) matches none of the backbone's variables")
    if sum(int(np.prod(shape)) * dtype.itemsize for _, shape, dtype in datasets) > budget:
        raise ConfigError(f"{refusal}: its datasets declare more weights than the backbone has")


def build_base(p: Params, key: str, layer: str | None = None) -> tuple[keras.Model, WeightsSource]:
    """The backbone without its top, cut at `layer` (by default its feature layer, the first if params list several),
    with the weights the weights stage materialised."""
    src = weights_source(p, key)
    base = load_base(p, key, p.resolve(src.path) if src.path else None)
    spec = p.backbones[key]
    return truncate(base, spec.at(spec.grid()[0]).feature_layer if layer is None else layer, key), src


def truncate(base: keras.Model, layer: str, key: str) -> keras.Model:
    """The base up to and including `layer` (the whole base when empty): its output is what gets pooled."""
    if not layer:
        return base
    names = [lyr.name for lyr in base.layers]
    if layer not in names:
        shown = ", ".join(names[-12:])
        raise ConfigError(f"backbones.{key}.feature_layer: {base.name} has no layer {layer!r}; its last layers are {shown}")
    return keras.Model(base.input, base.get_layer(layer).output, name=base.name)


@dataclass
class Network:
    base: keras.Model  # the backbone alone, cut at the feature layer (unfrozen in part for fine-tuning)
    extractor: keras.Model  # image (0-255 RGB) -> pooled features; frozen for transfer models
    head: keras.Model  # pooled features -> tumour probability
    full: keras.Model  # extractor then head: what is saved, evaluated and exported
    weights: WeightsSource
    end_to_end: bool  # True for the reference CNN: trained whole, no feature cache
    whole: keras.Model | None = None  # the uncut base with its weights, to cut at another layer
    layers: tuple[str, ...] = ("",)  # the feature layers the extractor pools, side by side in this order
    widths: tuple[int, ...] = ()  # each one's number of features

    def attach(self, head: keras.Model) -> None:
        """Use `head` on top of the extractor (the full model shares both)."""
        self.head = head
        self.full = stack(self.extractor, head, self.full.name)

    def split(self, feats: np.ndarray) -> dict[str, np.ndarray]:
        """The extractor's features, `layers` side by side, as one array per layer."""
        edges = np.cumsum([0, *self.widths])
        return {layer: feats[:, a:b] for layer, a, b in zip(self.layers, edges[:-1], edges[1:], strict=True)}


def stack(extractor: keras.Model, head: keras.Model, name: str) -> keras.Model:
    inp = keras.Input(extractor.input_shape[1:], name="image")
    return keras.Model(inp, head(extractor(inp)), name=name)


def build_network(p: Params, key: str, seed: int, layers: list[str] | None = None, bb: Backbone | None = None) -> Network:
    """The extractor (preprocessing, backbone, pooling) and a fresh head; the base is frozen unless end to end.

    With several `layers` (the candidates of a feature-layer grid), the extractor pools each of them in one pass
    through the base and puts the results side by side (`Network.split` takes them apart); `cut` then keeps the
    chosen one. `bb` is the backbone at one grid point (by default its first)."""
    spec = p.backbones[key]
    bb = bb or spec.at(spec.grid()[0])
    layers = list(layers) if layers is not None else [bb.feature_layer]
    src = weights_source(p, key)
    whole = load_base(p, key, p.resolve(src.path) if src.path else None)
    end_to_end = bb.application == SMALL_CNN
    if end_to_end and len(layers) > 1:
        raise ConfigError(f"backbones.{key}.feature_layer: {bb.application} trains end to end; it takes one feature layer, not a list")
    net = Network(whole, whole, whole, whole, src, end_to_end, whole=whole)  # cut sets the first four
    cut(net, p, key, layers, seed, bb)
    return net


def cut(net: Network, p: Params, key: str, layers: list[str], seed: int, bb: Backbone) -> None:
    """Point `net`'s base, extractor, head and full model at `layers` of its whole base (one layer, or several side by side)."""
    whole = net.whole
    parts = [truncate(whole, layer, key) for layer in layers]
    if len(parts) == 1:
        base = parts[0]
    else:
        base = keras.Model(whole.input, [m.output for m in parts], name=whole.name)
    base.trainable = net.end_to_end
    inp = keras.Input((bb.input_size, bb.input_size, 3), name="image")
    x = preprocess_layer(application(bb.application, key))(inp)
    x = base(x, training=None if net.end_to_end else False)  # frozen BatchNorm stays in inference mode
    pool = keras.layers.GlobalAveragePooling2D if bb.pooling == "avg" else keras.layers.GlobalMaxPooling2D
    if len(parts) == 1:
        pooled = pool(name="pool")(x)
    else:
        pooled = keras.layers.Concatenate(name="pool")([pool(name=f"pool_{i}")(o) for i, o in enumerate(x)])
    extractor = keras.Model(inp, pooled, name=f"{key}_features")
    net.base, net.extractor, net.layers = base, extractor, tuple(layers)
    net.widths = tuple(int(m.output.shape[-1]) for m in parts)
    net.head = build_head(int(extractor.output_shape[-1]), bb, seed, n_classes=len(p.ingest.classes))
    net.full = stack(extractor, net.head, key)


def output_layer(head: keras.Model) -> keras.layers.Layer:
    """The head's output Dense layer: the sigmoid unit of a two-class head, the softmax layer of an N-class one."""
    names = [layer.name for layer in head.layers]
    return head.get_layer(BINARY_OUTPUT if BINARY_OUTPUT in names else MULTI_OUTPUT)


def n_outputs(n_classes: int) -> int:
    """Output units for `n_classes` classes: one sigmoid unit for two, one softmax unit per class for more."""
    return 1 if n_classes == 2 else n_classes


def build_head(
    n_features: int,
    bb: Backbone,
    seed: int,
    adapt_on: np.ndarray | None = None,
    init_seed: int | None = None,
    n_classes: int = 2,
) -> keras.Model:
    """Dense, dropout, then a sigmoid unit (two classes) or `n_classes` softmax units (dense 0: the output layer
    alone); with `adapt_on`, the features are first standardised with their training mean and variance.

    The initial weights come from `init_seed` (default `seed`) alone, never from the global random state: a thread
    drawing from Python's `random` meanwhile (Prefect's client does, in a flow or test process) would change them."""
    init = seed if init_seed is None else init_seed
    inp = keras.Input((n_features,), name="features")
    x = inp
    if adapt_on is not None:
        norm = keras.layers.Normalization(axis=-1, name="feature_scale")
        norm.adapt(adapt_on)
        x = norm(x)
    glorot = keras.initializers.GlorotUniform
    penalty = keras.regularizers.L2(bb.l2) if bb.l2 else None  # what Keras's own fit (the end-to-end reference) minimises too
    if bb.dense:  # a hidden layer; dense 0 is a linear head, the logistic regression on the standardised features
        x = keras.layers.Dense(
            bb.dense, activation="relu", name="head_dense", kernel_initializer=glorot(seed=init), kernel_regularizer=penalty
        )(x)
        x = keras.layers.Dropout(bb.dropout, seed=seed, name="head_dropout")(x)
    binary = n_classes == 2
    last = keras.layers.Dense(
        n_outputs(n_classes),
        activation="sigmoid" if binary else "softmax",
        name=BINARY_OUTPUT if binary else MULTI_OUTPUT,
        kernel_initializer=glorot(seed=init + 1),
        kernel_regularizer=penalty,
    )
    return keras.Model(inp, last(x), name="head")


def _renumber_shared_ids(node, ids: dict):
    """Keras writes Python id() values as shared_object_id; number them in order of appearance instead."""
    if isinstance(node, dict):
        return {k: ids.setdefault(v, len(ids)) if k == "shared_object_id" else _renumber_shared_ids(v, ids) for k, v in node.items()}
    if isinstance(node, list):
        return [_renumber_shared_ids(v, ids) for v in node]
    return node


def save_model(model: keras.Model, path: str | Path) -> None:
    """Save as .keras, atomically and byte-reproducibly: equal weights give an equal file, so DVC sees no change."""
    with atomic_path(path) as tmp:
        model.save(tmp)
        with zipfile.ZipFile(tmp) as src:
            members = [(info, src.read(info)) for info in src.infolist()]
        with zipfile.ZipFile(tmp, "w") as dst:
            for info, data in members:
                if info.filename == "metadata.json":
                    meta = json.loads(data)
                    meta.pop("date_saved", None)
                    data = json.dumps(meta, sort_keys=True).encode()
                elif info.filename == "config.json":
                    data = json.dumps(_renumber_shared_ids(json.loads(data), {})).encode()
                fixed = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
                fixed.compress_type = info.compress_type
                dst.writestr(fixed, data)


def load_model(path: str | Path) -> keras.Model:
    """Load a saved model in Keras safe mode: a .keras file cannot run arbitrary code."""
    return keras.models.load_model(path, safe_mode=True, compile=False)


# what stays float32: the input, input scaling (ours is the layer named "preprocess"; some keras.applications bases
# carry Rescaling or Normalization layers of their own) and the pooling that makes the features
KEEP_FP32 = ("InputLayer", "Rescaling", "Normalization", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "Concatenate")


def in_bf16(model: keras.Model) -> keras.Model:
    """A copy of frozen `model` whose layers compute in bfloat16 (Keras's mixed_bfloat16 policy: the weights stay
    float32 and are cast with each layer's inputs, so oneDNN runs its bf16 kernels, float32 sums inside), but for the
    preprocessing (raw 0-255 pixels to the backbone's scale) and the pooling, which stay float32: the features come
    out float32. Built from the model's config with the same weights; Keras has no call that changes a built
    model's policy."""
    mixed = keras.dtype_policies.serialize(keras.dtype_policies.get("mixed_bfloat16"))

    def recast(node):
        if isinstance(node, list):
            return [recast(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {k: recast(v) for k, v in node.items()}
        cfg, kind = out.get("config"), out.get("class_name")
        layer = "module" in out and isinstance(kind, str) and not kind.startswith("__")  # not a tensor's record (__keras_tensor__)
        if layer and isinstance(cfg, dict) and "dtype" in cfg and kind not in KEEP_FP32 and cfg.get("name") != "preprocess":
            if kind not in ("Functional", "Model", "Sequential"):
                cfg["dtype"] = mixed
        return out

    copy = keras.Model.from_config(recast(model.get_config()))
    copy.set_weights(model.get_weights())
    return copy
