"""A seeded mutation fuzzer over the real images, for tests/test_hostile.py and benchmarks/fuzz.py.

Hand-written rather than Hypothesis because the inputs are real files mutated with format knowledge (PNG chunks
with right or wrong CRCs, JPEG and WebP metadata segments, TIFF headers), a case must be reproducible from
(seed, index) alone so that a worker process can regenerate it, and the offline environment has no Hypothesis.

Four surfaces, each run in worker processes (`python tests/fuzzing.py SEED START COUNT MODE`) under a memory cap
(RLIMIT_AS) with a per-case timeout (SIGALRM), and a batch timeout in the parent for hangs inside C code:
- "decode": each mutated input through the decoding boundary: it must decode or raise ImageError;
- "pipeline": a dataset folder of mutated files with hostile names (every control character, invalid UTF-8,
  very long names) through `brainmri ingest`, `split` and `predict` (in process, via cli.main): exit 0 or 2,
  no traceback, and no lost row: every file is ingested, quarantined or skipped, split reads exactly the rows
  ingest wrote, and predict writes one row per file, read back exactly;
- "metadata": export's model metadata with values export never writes through predict's reader: accepted within
  brainmri.deploy.metadata's limits, or refused in one short printable sentence;
- "graph": small export-like ONNX models whose extra branch is a random ConstantOfShape, Expand, Tile, Range, Loop
  (2^0..2^62 trips, a body that adds, passes through or is empty) or Reshape, with random sizes and metadata, through
  predict under a small memory cap and time limit: scored, or refused in one line, never a traceback, a hang, a
  temporary file left, or a worker past 1 GiB.
"""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "brain_tumor_dataset"
LIMITS = {"max_pixels": 40_000_000, "max_side": 512}
MEMORY_CAP = 3 << 30  # bytes of address space per worker: onnxruntime and numpy map about 1 GB before any work
CASE_TIMEOUT = 10.0  # seconds per input; the largest real image decodes in about 20 ms
GRAPH_MEMORY = 512 << 20  # a fuzzed model's worker: its memory cap (RLIMIT_DATA) ...
GRAPH_SECONDS = 2.0  # ... and its time limit per batch; a model that runs past either is refused by name
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
PNG_CHUNKS = (b"tEXt", b"zTXt", b"iTXt", b"iCCP", b"eXIf", b"sBIT", b"tRNS", b"PLTE", b"gAMA", b"pHYs", b"acTL", b"fcTL", b"IDAT")


def corpus() -> list[tuple[str, bytes]]:
    """Real scans re-encoded in every supported format and several modes, plus a few originals; deterministic."""
    files = sorted(SHARED_DATA.glob("*/*"))
    picks = [files[i] for i in range(0, len(files), max(1, len(files) // 8))][:8]
    out = [("ORIGINAL", f.read_bytes()) for f in picks[:3]]
    for k, f in enumerate(picks):
        with Image.open(f) as img:
            img = img.convert("RGB")
            img.thumbnail((96, 96))
        gray = img.convert("L")
        variants = [
            ("JPEG", img, {"quality": 90}),
            ("JPEG", gray, {"progressive": True}),
            ("JPEG", img.convert("CMYK"), {}),
            ("PNG", img, {}),
            ("PNG", img.convert("RGBA"), {}),
            ("PNG", img.convert("P"), {}),
            ("PNG", Image.fromarray(np.asarray(gray).astype(np.uint16) * 16), {}),
            ("WEBP", img, {"quality": 80}),
            ("WEBP", img.convert("RGBA"), {"lossless": True}),
            ("BMP", img, {}),
            ("BMP", img.convert("P"), {}),
            ("TIFF", img, {"compression": ("raw", "tiff_deflate", "tiff_lzw", "packbits")[k % 4]}),
            ("TIFF", Image.fromarray(np.asarray(gray).astype(np.float32) / 3), {}),
            ("GIF", img, {}),
        ]
        for fmt, im, kw in variants:
            buf = io.BytesIO()
            if fmt == "JPEG" and k % 2:
                exif = im.getexif()
                exif[0x0112] = 6
                kw = {**kw, "exif": exif.tobytes()}
            im.save(buf, format=fmt, **kw)
            out.append((fmt, buf.getvalue()))
    return out


def _chunk(kind: bytes, body: bytes, good_crc: bool) -> bytes:
    crc = zlib.crc32(kind + body) ^ (0 if good_crc else 0xDEADBEEF)
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc & 0xFFFFFFFF)


def _garbage(rng) -> bytes:
    kind = rng.integers(4)
    n = int(rng.integers(0, 400))
    if kind == 0:
        return rng.bytes(n)
    if kind == 1:  # a valid zlib stream of garbage, or a truncated one
        z = zlib.compress(rng.bytes(n))
        return z if rng.random() < 0.5 else z[: max(1, len(z) // 2)]
    if kind == 2:  # an EXIF/TIFF header with wild offsets and counts
        head = b"MM\x00*" if rng.random() < 0.5 else b"II*\x00"
        return head + rng.bytes(4) + struct.pack(">H", int(rng.integers(0, 65536))) + rng.bytes(n)
    return b"\xff" * n


def _png_metadata(rng, data: bytes) -> bytes:
    if not data.startswith(b"\x89PNG") or len(data) < 45:  # not a PNG, or cut before its IHDR chunk ends
        return _flip(rng, data)
    kind = PNG_CHUNKS[rng.integers(len(PNG_CHUNKS))]
    body = _garbage(rng)
    if kind in (b"zTXt", b"iCCP"):
        body = b"key\x00" + bytes([int(rng.integers(0, 3))]) + body
    elif kind == b"iTXt":
        body = b"key\x00" + bytes([int(rng.integers(0, 2)), 0]) + b"en\x00\x00" + body
    elif kind == b"tEXt":
        body = rng.bytes(int(rng.integers(0, 100)))
    at = 33 if rng.random() < 0.7 else len(data) - 12  # after IHDR, or just before IEND
    if rng.random() < 0.3:  # mangle IHDR itself: width/height/depth/colour type, CRC recomputed
        ihdr = bytearray(data[16:29])
        ihdr[int(rng.integers(0, 13))] = int(rng.integers(0, 256))
        return data[:8] + _chunk(b"IHDR", bytes(ihdr), rng.random() < 0.8) + data[33:]
    return data[:at] + _chunk(kind, body, rng.random() < 0.6) + data[at:]


def _jpeg_metadata(rng, data: bytes) -> bytes:
    if not data.startswith(b"\xff\xd8") or len(data) < 4:
        return _flip(rng, data)
    marker, prefix = [(0xE1, b"Exif\x00\x00"), (0xE2, b"ICC_PROFILE\x00\x01\x01"), (0xEE, b"Adobe"), (0xFE, b""), (0xE0, b"JFIF\x00")][
        int(rng.integers(5))
    ]
    body = prefix + _garbage(rng)[:60000]
    length = len(body) + 2 if rng.random() < 0.7 else int(rng.integers(0, 65536))
    return data[:2] + bytes([0xFF, marker]) + struct.pack(">H", length & 0xFFFF) + body + data[2:]


def _webp_metadata(rng, data: bytes) -> bytes:
    if not data.startswith(b"RIFF") or len(data) < 12:
        return _flip(rng, data)
    kind = (b"EXIF", b"ICCP", b"XMP ", b"VP8X", b"ANIM")[int(rng.integers(5))]
    body = _garbage(rng)
    size = len(body) if rng.random() < 0.7 else int(rng.integers(0, 1 << 32))
    chunk = kind + struct.pack("<I", size) + body + (b"\x00" if len(body) % 2 else b"")
    out = data[:12] + chunk + data[12:]
    riff = len(out) - 8 if rng.random() < 0.7 else int(rng.integers(0, 1 << 32))
    return out[:4] + struct.pack("<I", riff) + out[8:]


def _truncate(rng, data: bytes) -> bytes:
    cut = int(rng.integers(0, min(len(data), 600))) if rng.random() < 0.5 else int(rng.integers(0, len(data)))
    return data[:cut]


def _flip(rng, data: bytes) -> bytes:
    buf = bytearray(data)
    head = rng.random() < 0.5  # headers hold most of the structure: aim there half the time
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(0, min(len(buf), 256) if head else len(buf)))
        buf[i] ^= 1 << int(rng.integers(8)) if rng.random() < 0.5 else int(rng.integers(1, 256))
    return bytes(buf)


def _insert(rng, data: bytes) -> bytes:
    i = int(rng.integers(0, len(data) + 1))
    return data[:i] + rng.bytes(int(rng.integers(1, 65))) + data[i:]


def _delete(rng, data: bytes) -> bytes:
    i = int(rng.integers(0, len(data)))
    return data[:i] + data[i + int(rng.integers(1, 257)) :]


def _big_number(rng, data: bytes) -> bytes:
    buf = bytearray(data)
    i = int(rng.integers(0, max(1, min(len(buf) - 4, 512))))
    buf[i : i + 4] = (b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x01\x00\x00")[int(rng.integers(4))]
    return bytes(buf)


MUTATORS = (_truncate, _flip, _insert, _delete, _big_number, _png_metadata, _jpeg_metadata, _webp_metadata)


def mutate(seeds: list[tuple[str, bytes]], seed: int, index: int) -> tuple[str, bytes]:
    """Case `index` of run `seed`: one corpus file with one to three mutations; the same arguments, the same bytes."""
    rng = np.random.default_rng([seed, index])
    fmt, data = seeds[int(rng.integers(len(seeds)))]
    first = int(rng.integers(len(MUTATORS)))
    if index % 3 == 0:
        first = 0  # a third of all cases are truncations, spread over every format
    names = []
    for k in range(int(rng.integers(1, 4))):
        m = MUTATORS[first if k == 0 else int(rng.integers(len(MUTATORS)))]
        if data:
            data = m(rng, data)
        names.append(m.__name__.strip("_"))
    return f"{fmt}:{'+'.join(names)}", data


def hostile_names(rng, n: int) -> list[bytes]:
    """`n` file names as bytes: control characters (each of them in turn), invalid UTF-8, very long, odd but fine."""
    out = []
    controls = [*range(1, 0x20), 0x7F]
    for i in range(n):
        stem = f"case {i}".encode()
        kind = i % 8
        if kind == 0:
            name = stem + bytes([controls[(i // 8) % len(controls)]]) + b".png"
        elif kind == 1:
            name = stem + bytes([int(rng.integers(0x80, 0x100))]) + b"\xff.jpg"
        elif kind == 2:
            name = (stem + b" " + "\u00e9".encode() * 200)[:250] + b".jpg"  # 254 bytes of mostly 2-byte characters
        elif kind == 3:
            name = stem + b' , "quoted" ; =cmd() \xe2\x80\xa8 NA.png'  # CSV-hostile but legal (with U+2028)
        elif kind == 4:
            name = b"." + stem  # hidden: skipped
        else:
            name = stem + b".img"
        out.append(name)
    return out


def _limit(seconds: float):
    def expired(signum, frame):
        raise TimeoutError(f"case still running after {seconds} s")

    signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def _decode_batch(seeds, seed: int, start: int, count: int) -> dict:
    from brainmri.core.errors import ImageError
    from brainmri.intake.decode import decode_bytes

    ok = refused = 0
    failures = []
    for i in range(start, start + count):
        name, data = mutate(seeds, seed, i)
        _limit(CASE_TIMEOUT)
        try:
            decode_bytes(data, **LIMITS)
            ok += 1
        except ImageError as exc:
            refused += 1
            if "MemoryError" in str(exc):  # bounded by design: running out of memory is a failure, not a refusal
                failures.append({"case": i, "kind": name, "error": str(exc)})
        except BaseException as exc:  # noqa: BLE001 - anything else, a timeout included, is what the fuzzer looks for
            failures.append({"case": i, "kind": name, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return {"cases": count, "ok": ok, "refused": refused, "failures": failures}


def _hostile_dataset(seeds, seed: int, start: int, count: int, ds: Path) -> dict[str, list[bytes]]:
    """`ds`/{no,yes}: two usable images per class, then `count` mutated files under hostile names; the names written."""
    rng = np.random.default_rng([seed, start, 7])
    written = {"no": [], "yes": []}
    goods = [data for fmt, data in seeds if fmt == "JPEG"]  # three per scan; take different scans
    for c, label in enumerate(written):
        (ds / label).mkdir(parents=True)
        for k in range(2):  # usable images, so that a run of rejects still ingests
            (ds / label / f"good {k}.jpg").write_bytes(goods[3 * (2 * c + k)])
            written[label].append(f"good {k}.jpg".encode())
    for i, raw in zip(range(start, start + count), hostile_names(rng, count), strict=True):
        label = "yes" if i % 2 else "no"
        _, data = mutate(seeds, seed, i)
        (ds / label / os.fsdecode(raw)).write_bytes(data)
        written[label].append(raw)
    return written


def _ingest_and_split_problems(p, written: dict, run, stats: dict) -> list[str]:
    """Rows lost between the files written, ingest's report, its manifest and split's manifest."""
    import pandas as pd

    if run(["ingest"]) != 0:
        return []
    report = json.loads(p.path("ingest_report").read_text())
    stats.update(ingested=report["n_ingested"], quarantined=report["n_quarantined"], skipped=report["n_skipped"])
    problems = []
    n_entries = sum(len(v) for v in written.values())
    if report["n_files"] + report["n_skipped"] != n_entries or report["n_files"] != report["n_ingested"] + report["n_quarantined"]:
        problems.append(f"ingest: rows lost: {n_entries} files, report {report}")
    manifest = pd.read_csv(p.path("ingest_manifest"), keep_default_na=False)
    if len(manifest) != report["n_ingested"]:
        problems.append("ingest: manifest rows differ from n_ingested")
    if run(["split"]) == 0:
        rows = pd.read_csv(p.path("split_manifest"), keep_default_na=False)
        kept = sorted(manifest.loc[~manifest["conflict"].astype(bool), "source_path"])
        if sorted(rows["source_path"]) != kept:
            problems.append("split: split rows differ from ingest rows")
    return problems


def _predict_problems(ds: Path, written: dict, model: Path, out: Path, run, stats: dict) -> list[str]:
    """predict over the hostile folder: one row per file that is not hidden, each named printably."""
    import pandas as pd

    from brainmri.intake.archives import printable

    if run(["predict", "--model", str(model), "--out", str(out), str(ds)]) != 0:
        return []
    expected = sorted(
        os.fsdecode(os.path.join(os.fsencode(ds), label.encode(), n)) for label, names in written.items() for n in names if n[:1] != b"."
    )
    got = pd.read_csv(out, keep_default_na=False)
    stats.update(predicted=int((got["error"] == "").sum()), predict_errors=int((got["error"] != "").sum()))
    if sorted(got["path"]) != sorted(printable(x) for x in expected):
        return [f"predict: {len(got)} rows for {len(expected)} files"]
    return []


def _pipeline_batch(seeds, seed: int, start: int, count: int, work: Path) -> dict:
    """One dataset folder of `count` mutated files with hostile names through ingest, split and predict."""
    import contextlib
    import logging

    from factory import make_project, tiny_onnx

    from brainmri.config import load_params
    from flows.cli import main

    logging.disable(logging.CRITICAL)
    root = make_project(work / "proj", {"ingest": {"source": "ds", "min_images_per_class": 2}})
    written = _hostile_dataset(seeds, seed, start, count, root / "ds")
    model, p, case = tiny_onnx(work / "model.onnx"), load_params(root / "params.yaml"), f"{start}+{count}"
    failures = []
    stats = {"ingested": 0, "quarantined": 0, "skipped": 0, "predicted": 0, "predict_errors": 0, "exit_2": 0}

    def run(args: list[str]) -> int:
        _limit(CASE_TIMEOUT * count)
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                code = main(["--params", str(root / "params.yaml"), "-q", *args])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        text = err.getvalue()
        stats["exit_2"] += code == 2
        if code not in (0, 2) or "Traceback" in text or (code == 2 and len(text.strip().splitlines()) != 1):
            failures.append({"case": case, "kind": args[0], "error": f"exit {code}: {text[-500:]}"})
        return code

    try:
        problems = _ingest_and_split_problems(p, written, run, stats)
        problems += _predict_problems(root / "ds", written, model, work / "predictions.csv", run, stats)
        failures += [{"case": case, "kind": x.split(":")[0], "error": x.split(": ", 1)[1]} for x in problems]
    except BaseException as exc:  # noqa: BLE001
        failures.append({"case": case, "kind": "pipeline", "error": f"{type(exc).__name__}: {exc}"})
    return {"cases": count, **stats, "failures": failures}


# --- hostile models: ONNX graphs and metadata for predict ------------------------------------------------------

EXPORTED_META = {  # what export writes (brainmri/export/record.py onnx_metadata, every value through str())
    "model": "vgg16-aug",
    "input_size": "32",
    "max_side": "512",
    "max_pixels": "40000000",
    "crop_to_content": "False",
    "threshold": "0.5",
    "positive_class": "yes",
    "negative_class": "no",
    "weights": "random initialisation (no pretrained weights)",
}
BOMB_OPS = ("ConstantOfShape", "Expand", "Tile", "Range", "ExpandFromInput")
LOOP_BODIES = ("add", "identity", "empty")


def brainmri_graph(nodes, inits, extra: str | None, meta: dict | None = None, opset: int = 17, shape=None, size: int = 32):
    """An ONNX model as export makes them (input 'image' (batch, size, size, 3), output 'probability' (batch, 1),
    metadata as export writes it) whose probability is the mean brightness / 255, plus 0 x sum(`extra`), so that the
    `nodes` computing `extra` run and are not pruned."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    tail = [
        h.make_node(
            "ReduceMean",
            ["image", "axes123"] if opset >= 18 else ["image"],
            ["mean"],
            keepdims=1,
            **({} if opset >= 18 else {"axes": [1, 2, 3]}),
        )
    ]
    tail += [h.make_node("Flatten", ["mean"], ["flat"]), h.make_node("Mul", ["flat", "scale"], ["probability" if extra is None else "p0"])]
    if extra is not None:
        tail += [
            h.make_node("Cast", [extra], ["extra_f"], to=T.FLOAT),
            h.make_node("ReduceSum", ["extra_f"], ["extra_sum"], keepdims=0),
            h.make_node("Mul", ["extra_sum", "zero"], ["extra_zero"]),
            h.make_node("Add", ["p0", "extra_zero"], ["probability"]),
        ]
    inits = [*inits, nh.from_array(np.array(1 / 255, np.float32), "scale"), nh.from_array(np.array(0, np.float32), "zero")]
    inits.append(nh.from_array(np.array([1, 2, 3], np.int64), "axes123"))
    graph = h.make_graph(
        [*nodes, *tail],
        "hostile",
        [h.make_tensor_value_info("image", T.FLOAT, list(shape or ["batch", size, size, 3]))],
        [h.make_tensor_value_info("probability", T.FLOAT, ["batch", 1])],
        inits,
    )
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    proto.ir_version = 8
    h.set_model_props(proto, {**EXPORTED_META, "input_size": str(size), **(meta or {})})
    return proto


def bomb(op: str, n: int = 750_000_000, **kw):
    """A few hundred bytes that ask for n float32 values (3 GB at the default) when run."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    def const(name, value, dtype=np.int64):
        return nh.from_array(np.array(value, dtype), name)

    if op == "ConstantOfShape":
        nodes, inits = [h.make_node("ConstantOfShape", ["n"], ["big"], value=h.make_tensor("v", T.FLOAT, [1], [1.0]))], [const("n", [n])]
    elif op == "Expand":
        nodes, inits = [h.make_node("Expand", ["one", "n"], ["big"])], [const("one", [1.0], np.float32), const("n", [n])]
    elif op == "Tile":
        nodes, inits = [h.make_node("Tile", ["one", "n"], ["big"])], [const("one", [1.0], np.float32), const("n", [n])]
    elif op == "Range":
        nodes = [h.make_node("Range", ["a", "b", "d"], ["big"])]
        inits = [const("a", 0.0, np.float32), const("b", float(n), np.float32), const("d", 1.0, np.float32)]
    else:  # ExpandFromInput: the size is batch x n, so nothing can be folded before the image arrives
        nodes = [
            h.make_node("Shape", ["image"], ["shape"]),
            h.make_node("Slice", ["shape", "s0", "s1"], ["batch"]),
            h.make_node("Mul", ["batch", "n"], ["total"]),
            h.make_node("Expand", ["one", "total"], ["big"]),
        ]
        inits = [const("s0", [0]), const("s1", [1]), const("n", [n]), const("one", [1.0], np.float32)]
    return brainmri_graph(nodes, inits, "big", **kw)


def resident_bomb(n: int = 110_000_000, **kw):
    """n float32 values that ONNX Runtime folds into a constant at load and keeps (one of them is picked by the input's
    brightest pixel), so the loaded model holds them between batches: 440 MB at the default, within the run's cap."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    nodes = [
        h.make_node("Tile", ["one", "n"], ["big"]),
        h.make_node("ReduceMax", ["image"], ["brightest"], keepdims=0),
        h.make_node("Cast", ["brightest"], ["index"], to=T.INT64),
        h.make_node("Gather", ["big", "index"], ["used"]),
    ]
    inits = [nh.from_array(np.array([1.0], np.float32), "one"), nh.from_array(np.array([n], np.int64), "n")]
    return brainmri_graph(nodes, inits, "used", **kw)


def loop(body: str = "add", trips: int = 2**62, from_input: bool = False, **kw):
    """A Loop of `trips` iterations carrying one value; its body adds 1, is a single Identity, or holds no node. With
    `from_input` the count is the brightest pixel times `trips`: none on a black image, for ever on a scan."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    ins = [
        h.make_tensor_value_info("i", T.INT64, []),
        h.make_tensor_value_info("cond", T.BOOL, []),
        h.make_tensor_value_info("x", T.FLOAT, [1]),
    ]
    inits = []
    if body == "add":
        nodes, outs = [h.make_node("Identity", ["cond"], ["cond_out"]), h.make_node("Add", ["x", "step"], ["x_out"])], ["cond_out", "x_out"]
        inits = [nh.from_array(np.array([1.0], np.float32), "step")]
    elif body == "identity":
        nodes, outs = [h.make_node("Identity", ["cond"], ["cond_out"])], ["cond_out", "x"]
    else:
        nodes, outs = [], ["cond", "x"]
    graph = h.make_graph(
        nodes, "body", ins, [h.make_tensor_value_info(outs[0], T.BOOL, []), h.make_tensor_value_info(outs[1], T.FLOAT, [1])], inits
    )
    outer = [nh.from_array(np.array(True), "go"), nh.from_array(np.array([0.0], np.float32), "x0")]
    count = []
    if from_input:
        outer.append(nh.from_array(np.array(float(trips), np.float32), "per_level"))
        count = [
            h.make_node("ReduceMax", ["image"], ["brightest"], keepdims=0),
            h.make_node("Mul", ["brightest", "per_level"], ["trips_f"]),
            h.make_node("Cast", ["trips_f"], ["trips"], to=T.INT64),
        ]
    else:
        outer.append(nh.from_array(np.array(trips, np.int64), "trips"))
    return brainmri_graph([*count, h.make_node("Loop", ["trips", "go", "x0"], ["x_final"], body=graph)], outer, "x_final", **kw)


def lying_size(real: int = 64, **kw):
    """Metadata says 32 px; the graph's input dimensions are left open and it reshapes its input to `real` px."""
    from onnx import helper as h
    from onnx import numpy_helper as nh

    nodes = [h.make_node("Reshape", ["image", "real"], ["reshaped"])]
    inits = [nh.from_array(np.array([-1, real, real, 3], np.int64), "real")]
    return brainmri_graph(nodes, inits, "reshaped", shape=["batch", "height", "width", 3], **kw)


def vgg19(path: Path, size: int = 224) -> Path:
    """VGG19's convolutions at `size` px with random weights, and a sigmoid head, with export's metadata: what the
    largest exported model costs to run (80 MB of weights; 0.7 GB peak at batch 16 and 224 px)."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    nodes, inits = [h.make_node("Transpose", ["image"], ["x0"], perm=[0, 3, 1, 2])], []
    cur, c_in, k = "x0", 3, 0
    for block, (n, c) in enumerate([(2, 64), (2, 128), (4, 256), (4, 512), (4, 512)]):
        for _ in range(n):
            w = (rng.standard_normal((c, c_in, 3, 3)) * np.sqrt(2 / (9 * c_in))).astype(np.float32)
            inits += [nh.from_array(w, f"w{k}"), nh.from_array(np.zeros(c, np.float32), f"b{k}")]
            nodes += [h.make_node("Conv", [cur, f"w{k}", f"b{k}"], [f"c{k}"], pads=[1, 1, 1, 1]), h.make_node("Relu", [f"c{k}"], [f"r{k}"])]
            cur, c_in, k = f"r{k}", c, k + 1
        nodes.append(h.make_node("MaxPool", [cur], [f"p{block}"], kernel_shape=[2, 2], strides=[2, 2]))
        cur = f"p{block}"
    inits += [nh.from_array((rng.standard_normal((512, 1)) * 0.01).astype(np.float32), "wd"), nh.from_array(np.zeros(1, np.float32), "bd")]
    nodes += [h.make_node("GlobalAveragePool", [cur], ["g"]), h.make_node("Flatten", ["g"], ["f"])]
    nodes += [h.make_node("Gemm", ["f", "wd", "bd"], ["z"]), h.make_node("Sigmoid", ["z"], ["probability"])]
    graph = h.make_graph(
        nodes,
        "vgg19",
        [h.make_tensor_value_info("image", T.FLOAT, ["batch", size, size, 3])],
        [h.make_tensor_value_info("probability", T.FLOAT, ["batch", 1])],
        inits,
    )
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    proto.ir_version = 8
    h.set_model_props(proto, {**EXPORTED_META, "input_size": str(size)})
    onnx.save(proto, path)
    return path


def random_metadata(rng) -> dict:
    """Export's metadata with one to three values replaced by something export never writes (or by what it writes)."""
    meta = dict(EXPORTED_META)
    odd = [
        "true", "false", "TRUE", "1", "0", "yes", "", " True", "True ", "None", "nan", "-nan", "inf", "-inf", "1e400", "-1",
        "0x20", "1_000", " 224", "224 ", "+224", "2.0", "1.", ".5", "1e-05", "3.4e38", "99999999999999999999", "\x00", "\n",
        "a\nb", "\u202e", "\u2028", "=cmd()", "@SUM(A1)", "-0", "0.0", "1.0", "32", "1024", "1025", "31", "65535", "65536",
        "40000000", "40000001", "250000000", "250000001", "\x7f", "\u00e9", "x" * 101, "y" * 5000,
    ]  # fmt: skip
    for _ in range(int(rng.integers(1, 4))):
        key = [*EXPORTED_META, "max_file_bytes", "int8_reduce_range", "tta_flip", "int8_chosen_on_cpu_flags", f"extra{rng.integers(99)}"][
            int(rng.integers(14))
        ]
        roll = rng.random()
        if roll < 0.1:
            meta.pop(key, None)
        elif roll < 0.2:
            meta[key] = "".join(chr(int(c)) for c in rng.integers(1, 0x3000, int(rng.integers(0, 30))))
        elif roll < 0.25:
            meta.update({f"k{i}": "v" for i in range(int(rng.integers(1, 100)))})
        else:
            meta[key] = odd[int(rng.integers(len(odd)))]
    return meta


def random_graph(rng):
    """A small export-like model whose extra branch is a random chain of the ops above, with random shapes, sizes,
    trip counts and metadata: most are refused, run past a cap, or fail in the runtime; some run."""
    kind = int(rng.integers(5))
    meta = random_metadata(rng) if rng.random() < 0.3 else None
    size = int((32, 32, 48, 64, 1024, 8, 2048)[int(rng.integers(7))]) if rng.random() < 0.2 else 32
    if meta is None and size != 32:
        meta = {"input_size": str(size)}
    kw = {"meta": meta, "opset": int((13, 17, 18)[int(rng.integers(3))])}
    if kind == 0:
        n, op = int(10 ** rng.uniform(0, 10.5)), BOMB_OPS[int(rng.integers(5))]  # 1 .. 3e10 values
        return f"bomb:{op}:{n}", bomb(op, n, **kw)
    if kind == 1:
        trips = int(2 ** rng.uniform(0, 62.9))
        body = LOOP_BODIES[int(rng.integers(3))]
        return f"loop:{body}:{trips}", loop(body, trips, **kw)
    if kind == 2:
        real = int((16, 32, 64, 1)[int(rng.integers(4))])
        return f"lying_size:{real}", lying_size(real, **kw)
    if kind == 3:  # a Reshape to a random shape, most of them impossible
        from onnx import helper as h
        from onnx import numpy_helper as nh

        shape = [int(v) for v in rng.integers(-1, 40, int(rng.integers(1, 5)))]
        nodes = [h.make_node("Reshape", ["image", "to"], ["reshaped"])]
        return f"reshape:{shape}", brainmri_graph(nodes, [nh.from_array(np.array(shape, np.int64), "to")], "reshaped", **kw)
    return "plain", brainmri_graph(
        [], [], None, shape=["batch", size, size, 3][: int(rng.integers(3, 5))] if rng.random() < 0.2 else None, size=size, **kw
    )


def _metadata_batch(seed: int, start: int, count: int) -> dict:
    """Random metadata through predict's reader: it is accepted as in range, or refused in one sentence naming the key."""
    from brainmri.deploy import metadata

    accepted = refused = 0
    failures = []
    for i in range(start, start + count):
        meta = random_metadata(np.random.default_rng([seed, i, 3]))
        try:
            m = metadata.read(meta)
        except metadata.MetadataError as exc:
            refused += 1
            text = str(exc)
            if "\n" in text or "\r" in text or len(text) > 400 or not text.isprintable():
                failures.append({"case": i, "kind": "metadata", "error": f"not one short printable line: {text[:300]!r}"})
            continue
        except BaseException as exc:  # noqa: BLE001
            failures.append({"case": i, "kind": "metadata", "error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        accepted += 1
        ok = metadata.MIN_INPUT_SIZE <= m.size <= metadata.MAX_INPUT_SIZE and 0 <= m.threshold <= 1
        ok &= all(n.isprintable() and 0 < len(n) <= metadata.MAX_CLASS_NAME for n in (m.positive, m.negative))
        ok &= meta.get("crop_to_content", "False") in metadata.BOOLEANS and m.limits["max_pixels"] <= metadata.MAX_PIXELS
        if not ok:
            failures.append({"case": i, "kind": "metadata", "error": f"accepted out of range: {meta!r}"[:500]})
    return {"cases": count, "accepted": accepted, "refused": refused, "failures": failures}


def _graph_batch(seed: int, start: int, count: int, work: Path) -> dict:
    """Random small graphs through predict on two real scans, each under a small memory cap and short time limits:
    scored or refused in one line (BrainMRIError), never a traceback, a hang or a temporary file left."""
    import onnx

    from brainmri.core.errors import BrainMRIError
    from brainmri.deploy.predict import predict

    goods = [data for fmt, data in corpus() if fmt == "JPEG"][:2]
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    for k, data in enumerate(goods):
        (images / f"scan {k}.jpg").write_bytes(data)
    bounds = {"memory": GRAPH_MEMORY, "load_seconds": 20.0, "run_seconds": GRAPH_SECONDS}
    stats = {"scored": 0, "refused": 0, "limit": 0}
    failures = []
    for i in range(start, start + count):
        name, proto = random_graph(np.random.default_rng([seed, i, 5]))
        path, out = work / f"m{i}.onnx", work / f"out{i}.csv"
        onnx.save(proto, path)
        _limit(CASE_TIMEOUT + 20 + 2 * GRAPH_SECONDS)
        try:
            predict(path, [str(images)], out, bounds=bounds)
            stats["scored"] += 1
        except BrainMRIError as exc:
            text = str(exc)
            stats["limit" if type(exc).__name__ == "ModelLimitError" else "refused"] += 1
            if "\n" in text or "Traceback" in text:
                failures.append({"case": i, "kind": f"graph {name}", "error": f"not one line: {text[:300]!r}"})
        except BaseException as exc:  # noqa: BLE001 - a timeout included
            failures.append({"case": i, "kind": f"graph {name}", "error": f"{type(exc).__name__}: {exc}"[:500]})
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        left = [p.name for p in work.iterdir() if p.name.startswith(".")]
        if left:
            failures.append({"case": i, "kind": f"graph {name}", "error": f"left behind: {left}"})
            for p in work.iterdir():
                if p.name.startswith("."):
                    p.unlink()
        path.unlink()
        out.unlink(missing_ok=True)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if children > 1 << 30:
        failures.append({"case": f"{start}+{count}", "kind": "graph", "error": f"a model's worker reached {children >> 20} MB"})
    return {"cases": count, **stats, "worker_peak_rss_mb": children / 2**20, "failures": failures}


def worker(seed: int, start: int, count: int, mode: str, work: str) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    seeds = corpus()
    t0 = time.perf_counter()
    if mode == "decode":
        result = _decode_batch(seeds, seed, start, count)
    elif mode == "metadata":
        result = _metadata_batch(seed, start, count)
    elif mode == "graph":
        result = _graph_batch(seed, start, count, Path(work))
    else:
        result = _pipeline_batch(seeds, seed, start, count, Path(work))
    result["seconds"] = time.perf_counter() - t0
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def run_batch(seed: int, start: int, count: int, mode: str, work: Path, timeout: float) -> dict:
    """Run one batch in a fresh worker process; a crash, a kill or a hang of the worker is a failure of the batch."""
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)]), "BRAINMRI_QUIET": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(Path(__file__)), str(seed), str(start), str(count), mode, str(work)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"cases": count, "failures": [{"case": f"{start}+{count}", "kind": mode, "error": "batch hung"}]}
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        error = f"worker exit {res.returncode}: {res.stderr[-800:]}"
        return {"cases": count, "failures": [{"case": f"{start}+{count}", "kind": mode, "error": error}]}
    return json.loads(lines[-1])


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
