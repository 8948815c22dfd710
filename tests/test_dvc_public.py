"""The project uses DVC through its public interface only: no private DVC module imported, nothing of DVC's replaced.

A private module (a path segment starting with '_', e.g. dvc.utils.serialize._yaml) or a patched attribute of DVC's
modules or of a Repo's lock changes DVC's behaviour behind its back and breaks silently when DVC changes.
"""

import ast

from factory import REPO

FOLDERS = ("brainmri", "tasks", "flows", "tests", "benchmarks")


def is_dvc(module: str) -> bool:
    return module.split(".")[0] == "dvc" or module.startswith("dvc_")


def violations(source: str, name: str = "<code>") -> list[str]:
    """Each private DVC import, assignment to an attribute of a DVC module, or assignment to a repo's lock."""
    tree = ast.parse(source, name)
    dvc_names: set[str] = set()  # names bound to DVC modules or objects by this file's imports
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in (a for a in node.names if is_dvc(a.name)):
                dvc_names.add(alias.asname or alias.name.split(".")[0])
                if any(part.startswith("_") for part in alias.name.split(".")):
                    found.append(f"{name}:{node.lineno}: imports private {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and is_dvc(node.module):
            dvc_names.update(a.asname or a.name for a in node.names)
            for imported in (f"{node.module}.{a.name}" for a in node.names):
                if any(part.startswith("_") for part in imported.split(".")):
                    found.append(f"{name}:{node.lineno}: imports private {imported}")
    for node in ast.walk(tree):
        found += [f"{name}:{node.lineno}: {why}" for why in patches(node, dvc_names)]
    return found


def root_name(node) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def patches(node, dvc_names: set[str]) -> list[str]:
    """Why `node` replaces something of DVC's: an assignment or a setattr (monkeypatch's too)."""
    out = []
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else []
    for target in (t for t in targets if isinstance(t, ast.Attribute)):
        if root_name(target) in dvc_names:
            out.append(f"assigns {ast.unparse(target)} (a DVC module's attribute)")
        elif target.attr == "lock" and "repo" in ast.unparse(target.value).lower():
            out.append(f"assigns {ast.unparse(target)} (DVC's workspace lock)")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute) and ast.unparse(node.func).endswith("setattr"):
        first = node.args[0] if node.args else None
        if root_name(first) in dvc_names or (isinstance(first, ast.Constant) and is_dvc(str(first.value))):
            out.append(f"{ast.unparse(node.func)} on DVC: {ast.unparse(first)}")
    return out


def test_the_checker_finds_each_kind_of_private_use():
    bad = """
import dvc.stage.run
import dvc.utils.serialize._yaml as dvc_yaml
from dvc.utils.serialize import _yaml
from dvc.repo import Repo
dvc.stage.run.cmd_run = print
dvc_yaml.parse_yaml_for_update = print
repo.lock = None
self.repo.lock = None
monkeypatch.setattr(dvc_yaml, "parse_yaml", print)
monkeypatch.setattr("dvc.lock.make_lock", print)
"""
    found = violations(bad)
    assert len(found) == 8, found
    assert violations("from dvc.repo import Repo\nfrom dvc.lock import LockError\nwith Repo('.') as repo:\n    repo.status()\n") == []


def test_no_project_file_uses_dvc_privately():
    files = sorted(f for folder in FOLDERS for f in (REPO / folder).rglob("*.py"))
    assert len(files) > 50
    found = [v for f in files if f.name != "test_dvc_public.py" for v in violations(f.read_text(), str(f.relative_to(REPO)))]
    assert found == []
