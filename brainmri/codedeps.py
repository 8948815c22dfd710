"""Each stage's code dependencies, derived from the import graph: the project files its module imports, transitively.

`brainmri deps` prints them; `brainmri deps --write` puts them into dvc.yaml; tests/test_deps.py fails when dvc.yaml
differs. Written by hand over `ast` because the standard library's modulefinder also walks every third-party package
(TensorFlow alone takes minutes) and skips nothing we need: here every import statement counts, including those
inside functions, and only files of this project are followed.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("brainmri", "tasks", "flows")  # the project's own top-level packages
CODE_PREFIX = "${paths.code}"  # how dvc.yaml writes a code path (the demo workspace sets paths.code to "../")
STAGE_COMMAND = "brainmri"  # stage commands are `brainmri SUBCOMMAND ...`, which runs tasks/SUBCOMMAND.py


def module_file(root: Path, name: str) -> Path | None:
    """The project file of module `name` (a.b -> a/b.py or a/b/__init__.py), or None for anything else."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_of(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] != "__init__" else parts[:-1])


def imported_modules(root: Path, path: Path) -> set[str]:
    """Every module an import statement anywhere in `path` names (relative imports resolved)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = _package_of(root, path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def _with_parents(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def closure(root: Path, module: str) -> list[str]:
    """The project files `module` imports, directly or not, itself included: paths relative to `root`, sorted."""
    root = Path(root).resolve()
    seen: set[Path] = set()
    todo = [module]
    while todo:
        for name in _with_parents(todo.pop()):
            path = module_file(root, name)
            if path is None or path in seen:
                continue
            seen.add(path)
            todo.extend(imported_modules(root, path))
    return sorted(p.relative_to(root).as_posix() for p in seen)


def stage_module(cmd: str) -> str | None:
    """The module a dvc.yaml command runs: `brainmri train ${key}` -> tasks.train; None for other commands."""
    words = str(cmd).split()
    if len(words) >= 2 and words[0] == STAGE_COMMAND:
        return f"tasks.{words[1]}"
    return None


def _stage_body(stage: dict) -> dict:
    return stage["do"] if "do" in stage else stage


def expected_deps(root: Path, dvc_yaml: dict) -> dict[str, list[str]]:
    """For each stage of dvc.yaml (as written, before interpolation), the code deps it must list."""
    out = {}
    for name, stage in dvc_yaml["stages"].items():
        module = stage_module(_stage_body(stage).get("cmd", ""))
        if module:
            out[name] = [CODE_PREFIX + f for f in closure(root, module)]
    return out


def declared_deps(dvc_yaml: dict) -> dict[str, list[str]]:
    """For each stage, the code deps dvc.yaml lists now."""
    return {
        name: [d for d in _stage_body(stage).get("deps", []) if isinstance(d, str) and d.startswith(CODE_PREFIX)]
        for name, stage in dvc_yaml["stages"].items()
    }


def write(root: Path, dvc_file: Path) -> list[str]:
    """Rewrite the code deps of every stage in `dvc_file` (comments and order of other entries kept); return changed stages."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)  # dvc.yaml's own layout: list items indented under their key
    data = yaml.load(dvc_file.read_text(encoding="utf-8"))
    changed = []
    for name, want in expected_deps(root, data).items():
        body = _stage_body(data["stages"][name])
        deps = body.setdefault("deps", [])
        if [d for d in deps if isinstance(d, str) and d.startswith(CODE_PREFIX)] == want:
            continue
        keep = [d for d in deps if not (isinstance(d, str) and d.startswith(CODE_PREFIX))]
        deps.clear()
        deps.extend(keep + want)
        changed.append(name)
    if changed:
        with open(dvc_file, "w", encoding="utf-8") as f:
            yaml.dump(data, f)
    return changed
