"""A seeded mutation fuzzer over the real images, for tests/test_hostile.py and benchmarks/fuzz.py.

Hand-written rather than Hypothesis because the inputs are real files mutated with format knowledge (PNG chunks
with right or wrong CRCs, JPEG and WebP metadata segments, TIFF headers), a case must be reproducible from
(seed, index) alone so that a worker process can regenerate it, and the offline environment has no Hypothesis.

Two levels, each run in worker processes (`python tests/fuzzing.py SEED START COUNT MODE`) under a memory cap
(RLIMIT_AS) with a per-case timeout (SIGALRM), and a batch timeout in the parent for hangs inside C code:
- "decode": each mutated input through the decoding boundary: it must decode or raise ImageError;
- "pipeline": a dataset folder of mutated files with hostile names (every control character, invalid UTF-8,
  very long names) through `brainmri ingest`, `split` and `predict` (in process, via cli.main): exit 0 or 2,
  no traceback, and no lost row: every file is ingested, quarantined or skipped, split reads exactly the rows
  ingest wrote, and predict writes one row per file, read back exactly.
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


def _pipeline_batch(seeds, seed: int, start: int, count: int, work: Path) -> dict:
    """One dataset folder of `count` mutated files with hostile names through ingest, split and predict."""
    import contextlib
    import logging

    import pandas as pd
    from factory import make_project, tiny_onnx

    from brainmri.config import load_params
    from flows.cli import main

    logging.disable(logging.CRITICAL)
    rng = np.random.default_rng([seed, start, 7])
    root = make_project(work / "proj", {"ingest": {"source": "ds", "min_images_per_class": 2}})
    ds = root / "ds"
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
    model = tiny_onnx(work / "model.onnx")
    p = load_params(root / "params.yaml")
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
            failures.append({"case": f"{start}+{count}", "kind": args[0], "error": f"exit {code}: {text[-500:]}"})
        return code

    try:
        if run(["ingest"]) == 0:
            report = json.loads(p.path("ingest_report").read_text())
            stats.update(ingested=report["n_ingested"], quarantined=report["n_quarantined"], skipped=report["n_skipped"])
            n_entries = sum(len(v) for v in written.values())
            if report["n_files"] + report["n_skipped"] != n_entries or report["n_files"] != report["n_ingested"] + report["n_quarantined"]:
                failures.append({"case": f"{start}+{count}", "kind": "ingest", "error": f"rows lost: {n_entries} files, report {report}"})
            manifest = pd.read_csv(p.path("ingest_manifest"), keep_default_na=False)
            if len(manifest) != report["n_ingested"]:
                failures.append({"case": f"{start}+{count}", "kind": "ingest", "error": "manifest rows differ from n_ingested"})
            if run(["split"]) == 0:
                rows = pd.read_csv(p.path("split_manifest"), keep_default_na=False)
                kept = sorted(manifest.loc[~manifest["conflict"].astype(bool), "source_path"])
                if sorted(rows["source_path"]) != kept:
                    failures.append({"case": f"{start}+{count}", "kind": "split", "error": "split rows differ from ingest rows"})
        out = work / "predictions.csv"
        if run(["predict", "--model", str(model), "--out", str(out), str(ds)]) == 0:
            expected = sorted(
                os.fsdecode(os.path.join(os.fsencode(ds), label.encode(), n))
                for label, names in written.items()
                for n in names
                if n[:1] != b"."
            )
            from brainmri.intake.archives import printable

            got = pd.read_csv(out, keep_default_na=False)
            stats.update(predicted=int((got["error"] == "").sum()), predict_errors=int((got["error"] != "").sum()))
            if sorted(got["path"]) != sorted(printable(p) for p in expected):
                failures.append({"case": f"{start}+{count}", "kind": "predict", "error": f"{len(got)} rows for {len(expected)} files"})
    except BaseException as exc:  # noqa: BLE001
        failures.append({"case": f"{start}+{count}", "kind": "pipeline", "error": f"{type(exc).__name__}: {exc}"})
    return {"cases": count, **stats, "failures": failures}


def worker(seed: int, start: int, count: int, mode: str, work: str) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    seeds = corpus()
    t0 = time.perf_counter()
    result = _decode_batch(seeds, seed, start, count) if mode == "decode" else _pipeline_batch(seeds, seed, start, count, Path(work))
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
