"""Hypothesis strategies for hostile params.yaml files: every key of the repository's params replaced by values of
every type and path form, for tests/test_fuzz_params.py and benchmarks/fuzz.py (issue 32).

A case passes when loading the params ends in exit 0 or exit 2 with one line (never a traceback), and nothing is
created outside the case's own folder (a shell injection in a key would `touch` a file; a data root elsewhere would
be made there)."""

from __future__ import annotations

import copy
import io
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import yaml
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((REPO / "params.yaml").read_text())
SHELL = ["x;touch pwned;#", "$(touch pwned)", "`touch pwned`", "a|b", "a&&b", "a\nb", "-rf", "--help", "' or 1 '"]
PATHS = ["", ".", "..", "/", "/etc", "../elsewhere", "data/../..", "weights/../x.h5", "a" * 300, "x/" * 2100, "\x00", "data/raw/\ud800"]


def leaves(node, prefix=()) -> list[tuple]:
    """Every key path of a params mapping, sections and values alike."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((*prefix, k))
            out += leaves(v, (*prefix, k))
    return out


KEYS = leaves(BASE)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(SHELL + PATHS),
)
values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8
)


@st.composite
def hostile_params(draw) -> dict:
    """The repository's params with one to three keys replaced, renamed or dropped."""
    params = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(KEYS))
        parent = params
        for part in path[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
            if not isinstance(parent, dict):
                break
        if not isinstance(parent, dict) or path[-1] not in parent:
            continue
        action = draw(st.sampled_from(["value", "rename", "drop"]))
        if action == "value":
            parent[path[-1]] = draw(values)
        elif action == "rename":
            parent[draw(st.sampled_from(SHELL + ["vgg16", "models", "x" * 70, " "]))] = parent.pop(path[-1])
        else:
            del parent[path[-1]]
    return params


def check_case(folder: Path, params: dict) -> str | None:
    """Write `params` into an empty `folder`, run `brainmri params` on it; the problem found, or None."""
    from flows.cli import main

    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(params.get("paths"), dict) and "data_root" in params["paths"]:
        params["paths"]["data_root"] = str(folder / "data-root")  # never a folder outside the case's own
    try:
        text = yaml.safe_dump(params, allow_unicode=True, sort_keys=False)
    except (yaml.YAMLError, UnicodeEncodeError):
        return None  # not writable as YAML: not a case
    (folder / "params.yaml").write_text(text, encoding="utf-8", errors="surrogateescape")
    before = set(os.listdir(folder))
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            code = main(["--params", str(folder / "params.yaml"), "params"])
    except BaseException as exc:  # noqa: BLE001  (a traceback is what this looks for)
        return f"{type(exc).__name__}: {exc}"
    made = set(os.listdir(folder)) - before - {"data-root"}
    if code not in (0, 2):
        return f"exit {code}: {err.getvalue()[-300:]}"
    if code == 2 and (len(err.getvalue().strip().splitlines()) != 1 or "Traceback" in err.getvalue()):
        return f"not one line: {err.getvalue()[-300:]}"
    if made or (Path.cwd() / "pwned").exists():
        return f"created {sorted(made)}"
    return None
