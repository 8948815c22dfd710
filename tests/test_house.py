"""The house rules that keep the code easy to read (issue 30), checked so that they stay true."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("brainmri", "tasks", "flows")
MAX_FUNCTION_LINES = 60  # nanoGPT's longest is 55: a function you read top to bottom on one screen
MAX_README_LINES = 220  # about 200: a newcomer's page; everything else lives in docs/


def functions(root: Path):
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(REPO), node


def test_no_function_in_the_product_is_over_60_lines():
    long = [
        f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for folder in PRODUCT
        for path, node in functions(REPO / folder)
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "functions over 60 lines: " + "; ".join(long)


def test_readme_is_for_a_newcomer():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; measurements and reference go into docs/"
    near_top = " ".join(lines[:10]).lower()
    assert "not a medical device" in near_top, "the README says near its top that this is not a medical device"


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    return subprocess.run([str(exe), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("module", "source", "broken"),
    [
        ("tasks/train.py", "from tasks.split import split\n", "stages never import each other"),
        ("brainmri/intake/parts.py", "import flows.pipeline\n", "the library never imports stages or flows"),
        ("brainmri/deploy/predict.py", "import tensorflow\n", "deploy never imports TensorFlow"),
        ("brainmri/deploy/predict.py", "from brainmri.learn import models\n", "deploy never imports TensorFlow"),
        ("brainmri/core/files.py", "from brainmri.config import Params\n", "layers"),
    ],
)
def test_the_import_contract_catches_each_kind_of_wrong_arrow(tmp_path, module, source, broken):
    """The contract in pyproject.toml, run on a copy of the code with one wrong import added: it must fail, naming it
    (the old code had every one of these arrows but the last: tasks.ensemble imported tasks.benchmark, and the CLI,
    inside the library, imported flows)."""
    for name in (*PRODUCT, "pyproject.toml"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    target = tmp_path / module
    target.write_text(source + target.read_text(encoding="utf-8"), encoding="utf-8")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout[-2000:]
    verdicts = [line for line in result.stdout.splitlines() if line.rstrip().endswith(("KEPT", "BROKEN"))]
    assert [line for line in verdicts if broken in line and line.rstrip().endswith("BROKEN")], result.stdout[-2000:]
