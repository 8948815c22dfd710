"""An exported model's metadata, read strictly: exactly the forms export writes (brainmri/export/record.py
onnx_metadata, every value through str()), numbers within the ranges below, strings short and printable.

The limits are the module constants; the params that export carries into a model (ingest.max_side, max_pixels,
max_file_bytes, a backbone's input_size) must stay within them, or predict refuses the model it made. The pixel and
byte caps are what keeps a predict run under 1.5 GiB: decoding a 40-megapixel RGBA PNG at max_side 512 peaks at
1.1 GB (measured on 2 cores, AMD EPYC), and the model's worker holds up to brainmri.deploy.sandbox.MEMORY_BYTES more.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from brainmri.core.errors import BrainMRIError

# the limits params share (brainmri/core/limits.py: what params accept, predict accepts in a model's metadata)
from brainmri.core.limits import MAX_CLASSES, MAX_FILE_BYTES, MAX_INPUT_SIZE, MAX_PIXELS, MAX_SIDE, MIN_INPUT_SIZE  # noqa: E402

MAX_CLASS_NAME = 100  # characters of a class name, which every output row repeats
MAX_VALUE_CHARS = 4096  # characters of any metadata value (a weights description, an ensemble's members)
MAX_KEYS = 64  # export writes a dozen
BOOLEANS = ("True", "False")  # str(bool): what export writes for crop_to_content, int8_reduce_range, tta_flip
REQUIRED = ("input_size", "threshold", "positive_class", "negative_class")
REQUIRED_CLASSES = ("input_size", "classes")  # an N-class model's: its class names in place of a threshold and two names
BINARY_ONLY = ("threshold", "positive_class", "negative_class")  # never in an N-class model's metadata
_INT = re.compile(r"-?[0-9]+")  # str(int)
_FLOAT = re.compile(r"-?[0-9]+(\.[0-9]+)?(e[-+][0-9]+)?|-?[0-9]+")  # str(float), or an int where a float goes


class MetadataError(BrainMRIError):
    """A model's metadata is not what export writes."""


@dataclass(frozen=True)
class Metadata:
    """What predict takes from a model's metadata, checked."""

    size: int
    threshold: float | None  # None for an N-class model: its label is the arg-max class
    positive: str
    negative: str
    limits: dict  # decode_file's keyword arguments: max_pixels, max_side, max_bytes, crop_to_content
    int8_reduce_range: bool | None
    cpu_flags: str
    classes: tuple[str, ...] | None = None  # an N-class model's class names, in the order of its output columns


def _shown(raw: str) -> str:
    return repr(raw) if len(raw) <= 40 else f"{raw[:40]!r}... ({len(raw)} characters)"


def _number(meta: dict, key: str, kind: type, lo: float, hi: float, default=None):
    """`key` as an int or float within lo..hi, written as str() writes it; MetadataError otherwise."""
    raw = meta.get(key, None if default is None else str(default))
    try:
        value = kind(raw)
    except (TypeError, ValueError, OverflowError):
        raise MetadataError(f"metadata {key}={_shown(str(raw))} is not {'an integer' if kind is int else 'a number'}") from None
    if not lo <= value <= hi or (kind is float and not math.isfinite(value)):  # NaN fails the range too
        raise MetadataError(f"metadata {key}={_shown(raw)} is outside {lo}..{hi}")
    if not (_INT if kind is int else _FLOAT).fullmatch(raw):  # int() and float() also take ' 1', '1_0', '+1', '1.'
        raise MetadataError(f"metadata {key}={_shown(raw)} is not written as export writes {'an integer' if kind is int else 'a number'}")
    return value


def _boolean(meta: dict, key: str, default: str | None) -> bool | None:
    raw = meta.get(key, default)
    if raw is None:
        return None
    if raw not in BOOLEANS:
        raise MetadataError(f"metadata {key}={_shown(raw)} is neither True nor False, the two values export writes")
    return raw == "True"


def _text(meta: dict, key: str, limit: int) -> str:
    raw = meta.get(key, "")
    if len(raw) > limit or not raw.isprintable():
        why = f"is longer than {limit} characters" if len(raw) > limit else "holds a control or other unprintable character"
        raise MetadataError(f"metadata {key}={_shown(raw)} {why}")
    return raw


def _class_name(raw: str, name) -> str:
    """One name of the `classes` list: a non-empty printable string of at most MAX_CLASS_NAME characters."""
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_CLASS_NAME or not name.isprintable():
        shown = _shown(name) if isinstance(name, str) else json.dumps(name)[:40]
        why = f"1-{MAX_CLASS_NAME} printable characters"
        raise MetadataError(f"metadata classes={_shown(raw)} holds {shown}, which is not a class name ({why})")
    return name


def classes(meta: dict[str, str]) -> tuple[str, ...]:
    """An N-class model's class names: `classes` as export writes it (json.dumps of a list of 3 to MAX_CLASSES
    different names); MetadataError naming the key otherwise."""
    raw = meta["classes"]
    try:
        names = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: brackets nested a thousand deep
        raise MetadataError(f"metadata classes={_shown(raw)} is not a JSON list of class names") from None
    if not isinstance(names, list) or not 3 <= len(names) <= MAX_CLASSES:
        what = f"a list of {len(names)} names" if isinstance(names, list) else f"a JSON {type(names).__name__}"
        raise MetadataError(f"metadata classes={_shown(raw)} is {what}; an N-class model has 3 to {MAX_CLASSES}")
    names = [_class_name(raw, n) for n in names]
    if len(set(names)) != len(names):
        raise MetadataError(f"metadata classes={_shown(raw)} names a class twice")
    if json.dumps(names) != raw:  # json.loads also takes spaces, escapes and duplicate forms export never writes
        raise MetadataError(f"metadata classes={_shown(raw)} is not written as export writes it (json.dumps of the list)")
    return tuple(names)


def width(meta: dict[str, str]) -> int:
    """Values per image the model's output should hold by its metadata: the number of classes when `classes` reads
    as export writes it, else 1 (a binary model, or metadata that `read` will refuse by name)."""
    if "classes" not in meta or len(meta["classes"]) > MAX_VALUE_CHARS:
        return 1
    try:
        return len(classes(meta))
    except MetadataError:
        return 1


def _check_sizes(meta: dict[str, str], required: tuple[str, ...]) -> None:
    """At most MAX_KEYS keys, the `required` ones there, and no key or value too long."""
    if len(meta) > MAX_KEYS:
        raise MetadataError(f"the metadata has {len(meta)} entries; an exported model has at most {MAX_KEYS}")
    missing = [k for k in required if k not in meta]
    if missing:
        raise MetadataError(f"not exported by brainmri (metadata lacks {', '.join(missing)})")
    for key, value in meta.items():
        if len(key) > 100 or len(value) > MAX_VALUE_CHARS:
            name = key if len(key) <= 100 and key.isprintable() else _shown(key)
            raise MetadataError(f"metadata {name}={_shown(value)} is longer than {MAX_VALUE_CHARS} characters")


def _decision(meta: dict[str, str]) -> tuple[float | None, str, str, tuple[str, ...] | None]:
    """The threshold and the two class names of a binary model; None, "", "" and the class names of an N-class one."""
    if "classes" in meta:
        stray = [k for k in BINARY_ONLY if k in meta]
        if stray:
            raise MetadataError(f"metadata has classes and {', '.join(stray)}: an N-class model has none of {', '.join(BINARY_ONLY)}")
        return None, "", "", classes(meta)
    threshold = _number(meta, "threshold", float, 0.0, 1.0)  # training's Youden threshold lies in 0..1
    pos, neg = _text(meta, "positive_class", MAX_CLASS_NAME), _text(meta, "negative_class", MAX_CLASS_NAME)
    if not pos.strip() or not neg.strip() or pos == neg:
        raise MetadataError(f"metadata classes {_shown(pos)} and {_shown(neg)} must be two different non-empty names")
    return threshold, pos, neg, None


def read(meta: dict[str, str]) -> Metadata:
    """Every value predict uses, checked; MetadataError (one sentence naming the key) on anything else. A model with
    `classes` is an N-class one (threshold, positive_class and negative_class absent); without, a binary one."""
    _check_sizes(meta, REQUIRED_CLASSES if "classes" in meta else REQUIRED)
    size = _number(meta, "input_size", int, MIN_INPUT_SIZE, MAX_INPUT_SIZE)
    threshold, pos, neg, names = _decision(meta)
    limits = {
        "max_pixels": _number(meta, "max_pixels", int, 1, MAX_PIXELS, MAX_PIXELS),  # as ingest did
        "max_side": _number(meta, "max_side", int, 1, MAX_SIDE, 512),
        "max_bytes": _number(meta, "max_file_bytes", int, 1, MAX_FILE_BYTES, MAX_FILE_BYTES),
        "crop_to_content": _boolean(meta, "crop_to_content", "False"),  # as ingest normalized the training images
    }
    _boolean(meta, "tta_flip", None)  # an ensemble's: not used here, but held to what export writes
    reduce_range = _boolean(meta, "int8_reduce_range", None)
    return Metadata(size, threshold, pos, neg, limits, reduce_range, _text(meta, "int8_chosen_on_cpu_flags", 1000), names)
