"""int8 activation ranges of a frozen base, calibrated once per base and calibration sample (issue 33).

The aug and noaug models of a backbone share their frozen base and their calibration images (a seeded sample of the
same training split), and only the head, which stays float, differs. The base's activation ranges are then the same
numbers: each tensor's range depends only on the nodes upstream of it and the images. Calibration feeds every image
through the whole graph and builds a histogram of every activation (VGG19 at 224 px: 28 s of a 69 s export on 2
cores), so the second model of a backbone now reads them from `paths.onnx_cache`, beside the bases' ONNX graphs: a
memo, not a DVC output.

An entry is ONNX Runtime's own calibration cache (the JSON `quantize_static` writes and reads) cut down to the base's
tensors, named by a hash of everything those ranges depend on: every node before the head in the pre-processed graph
(operator, attributes, wiring, weight values), the calibration images' bytes in order, the input size, the method
and batch, ONNX Runtime's version, the CPU, its instruction sets and its core count (the calibration session runs
on every core, and another CPU's kernels sum in another order), and this code. A model whose base differs in any
weight, cut or image gets an entry of its own. Written by hand: ONNX Runtime's cache is one file per calibration,
keyed by nothing, and would hand one model's head ranges to another. On the real set the int8 file quantized from a
sibling's entry is the one its own calibration gives, byte for byte (tests/test_export.py checks it on phantoms).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import onnx

from brainmri.core.files import read_verified, write_verified
from brainmri.core.progress import log
from brainmri.export.quantize import head_nodes

SUFFIX = ".ranges.json"


def base_tensors(graph: onnx.GraphProto) -> set[str]:
    """Every tensor a node before the head reads or writes: the tensors whose ranges the head cannot change."""
    head = set(head_nodes(graph))
    return {t for n in graph.node if n.name not in head for t in (*n.input, *n.output) if t}


def ranges_key(graph: onnx.GraphProto, images: list, size: int, method: str, batch: int) -> str:
    """What the base's activation ranges in the pre-processed `graph` depend on, hashed (the module's docstring)."""
    import onnxruntime

    from brainmri.core.machine import cpu_flags, cpu_model

    head, weights = set(head_nodes(graph)), {t.name: t for t in graph.initializer}
    h = hashlib.sha256()
    for node in graph.node:
        if node.name not in head:
            h.update(node.SerializeToString())
            for name in node.input:
                if name in weights:
                    h.update(weights[name].SerializeToString())
    for path in images:
        h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    h.update(repr((size, method, batch, onnxruntime.__version__, cpu_model(), cpu_flags(), os.cpu_count())).encode())
    for code in (Path(__file__), Path(__file__).with_name("quantize.py")):
        h.update(code.read_bytes())
    return h.hexdigest()[:24]


def restore(folder: Path, key: str, ranges: Path) -> bool:
    """Write `key`'s cached ranges to `ranges`, where quantize_static reads them instead of calibrating; False when
    there are none."""
    data = read_verified(folder, key, SUFFIX, "calibrating again")
    if data is None:
        return False
    ranges.write_bytes(data)
    log.info("export: int8 activation ranges of the frozen base from the cache (%s)", key)
    return True


def keep(folder: Path, key: str, ranges: Path, graph: onnx.GraphProto) -> None:
    """Cache the base's part of the ranges a calibration wrote to `ranges` (ONNX Runtime's JSON) for the pre-processed
    `graph`, unless cached."""
    if not ranges.is_file() or any(folder.glob(f"{key}-*{SUFFIX}")):
        return
    whole = json.loads(ranges.read_text(encoding="utf-8"))
    base = base_tensors(graph)
    whole["data"] = {name: value for name, value in whole["data"].items() if name in base}
    folder.mkdir(parents=True, exist_ok=True)
    write_verified(folder, key, SUFFIX, json.dumps(whole, sort_keys=True).encode())
