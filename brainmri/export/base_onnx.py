"""The frozen base's ONNX graph, converted once per backbone, cut, input size and weights, and composed with each
model's head (issue 33, decision 2).

A transfer model is the same frozen extractor (preprocessing, base, pooling) with a small head on top: the aug and
noaug models of a backbone share it, and each export converted it again. Here the
extractor is converted once into a content-addressed cache (`paths.onnx_cache`, a memo like the feature cache, not a
DVC output), and each model's head alone (a few layers) is converted and joined to it with `onnx.compose`, as the
ensemble joins its members. The export's parity check against Keras runs on the composed graph, as it ran on the
whole conversion.

An entry is keyed by everything the conversion's output depends on: the extractor's architecture and weight bytes,
the opset, the versions of TensorFlow and tf2onnx and this conversion code. It is named `<key>-<sha256 of its
bytes>.onnx` and checked against that hash when read, so a truncated or tampered entry is converted again, never
used. A fine-tuned or end-to-end model has weights of its own, so its extractor gets an entry of its own.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx

from brainmri.core.files import read_verified, write_verified
from brainmri.core.progress import log

HEAD = "head"  # the name of the head model inside the saved network (brainmri.learn.models.build_head)
FEATURES = "features"  # the head graph's input: the pooled features


def split_network(model) -> tuple[object, object] | None:
    """(extractor, head) of a network saved by train (image -> extractor -> head), or None for any other shape."""
    import keras

    layers = model.layers
    if len(layers) != 3 or not all(isinstance(layer, keras.Model) for layer in layers[1:]) or layers[2].name != HEAD:
        return None
    return layers[1], layers[2]


def base_key(extractor, opset: int) -> str:
    """What the extractor's conversion depends on, hashed: its architecture and weights, the opset, the converter."""
    import tensorflow as tf
    import tf2onnx

    from brainmri.export import convert
    from brainmri.learn.features import architecture

    h = hashlib.sha256()
    h.update(architecture(extractor).encode())
    for w in extractor.get_weights():
        h.update(w.dtype.str.encode() + str(w.shape).encode() + w.tobytes())
    for part in (str(opset), tf.__version__, tf2onnx.__version__):
        h.update(part.encode())
    for code in (Path(__file__), Path(convert.__file__)):  # a change to how graphs are converted or named converts again
        h.update(code.read_bytes())
    return h.hexdigest()[:24]


def cached_base(folder: Path, extractor, size: int, opset: int, convert_fn) -> onnx.ModelProto:
    """The extractor's ONNX graph from the cache, or converted by `convert_fn(extractor, size, opset)` and cached."""
    key = base_key(extractor, opset)
    folder.mkdir(parents=True, exist_ok=True)
    if (data := read_verified(folder, key, ".onnx", "converting the base again")) is not None:
        log.info("export: the frozen base's ONNX graph from the cache (%s)", key)
        return onnx.load_from_string(data)
    proto = convert_fn(extractor, size, opset)
    write_verified(folder, key, ".onnx", proto.SerializeToString())  # two exports converting at once write the same file
    return proto


def compose_with_head(base: onnx.ModelProto, head: onnx.ModelProto, output: str) -> onnx.ModelProto:
    """One graph: the base's pooled features fed into the head; its input the base's, its output named `output` (the
    name the whole network's conversion gives it)."""
    b_in, b_out, h_in = base.graph.input[0].name, base.graph.output[0].name, head.graph.input[0].name
    made_by = {"producer_name": base.producer_name, "producer_version": base.producer_version}  # tf2onnx, as before
    merged = onnx.compose.merge_models(base, head, io_map=[(b_out, h_in)], prefix1="base_", prefix2="head_", **made_by)
    g = merged.graph
    renames = {g.input[0].name: b_in, g.output[0].name: output}
    for node in g.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    g.input[0].name, g.output[0].name = b_in, output
    opsets = {o.domain: o.version for o in merged.opset_import}  # merge_models lists both graphs' imports, each domain twice
    del merged.opset_import[:]
    merged.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
    onnx.checker.check_model(merged)
    return merged
