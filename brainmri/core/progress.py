"""Progress bars and stage summaries: a bar on a terminal, one summary line per stage, quiet in tests."""

from __future__ import annotations

import logging
import os
import sys

from tqdm import tqdm

log = logging.getLogger("brainmri")


def quiet() -> bool:
    return os.environ.get("BRAINMRI_QUIET", "") not in ("", "0")


def progress(iterable, desc: str, total: int | None = None):
    """Wrap a long loop in a progress bar on stderr when it is a terminal and output is not silenced."""
    disable = quiet() or not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=disable, unit="img", leave=False, dynamic_ncols=True)


def summary(stage: str, text: str) -> None:
    """The one line a stage prints when it finishes."""
    log.info("%s: %s", stage, text)
