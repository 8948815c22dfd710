"""Limits that params and exported models' metadata share: what params accept, predict accepts too.

A value that passed `brainmri params` once and was then refused by `predict` in the model's metadata (max_side 70000,
input_size 2048, a class named " ") is checked here, on both sides, against the same numbers."""

import re

MIN_INPUT_SIZE = 32  # the smallest input the backbones accept
MAX_INPUT_SIZE = 1024  # every backbone here takes 224 px or less; 1024 bounds a batch at 16 x 1024^2 x 3 float32 = 200 MB
MAX_SIDE = 65_535  # ingest's downscale target at most the largest side a PNG, JPEG or WebP encoder writes
MAX_PIXELS = 40_000_000  # ingest.max_pixels at most: decoding that many RGBA pixels peaks at 1.1 GB, and predict
# (which decodes by the model's own metadata) must stay under 1.5 GiB with the model's worker beside it
MAX_FILE_BYTES = 250_000_000  # ingest.max_file_bytes at most: predict holds a whole file while decoding it
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # model and backbone keys: they reach dvc.yaml's shell commands
MAX_CLASSES = 50  # ingest.classes at most: 50 of the longest class names (64 characters) fit a model's metadata value as JSON
CLASS_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9 _.-]{0,62}[A-Za-z0-9_.-])?")  # a folder name, a CSV column, a report label
MAX_PATH_BYTES = 4096  # Linux's PATH_MAX: a longer path cannot be opened, and a traceback named no key
MAX_PART_BYTES = 255  # NAME_MAX: the longest single file or folder name most file systems take


def path_problem(value: str) -> str | None:
    """Why `value` cannot be a path on this machine (too long, a part too long, a NUL or control character), or None."""
    raw = value.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_PATH_BYTES:
        return f"is {len(raw)} bytes long; paths are at most {MAX_PATH_BYTES}"
    if any(len(part) > MAX_PART_BYTES for part in raw.split(b"/")):
        return f"has a file or folder name over {MAX_PART_BYTES} bytes"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "holds a control character"
    return None
