"""Each stage's code dependencies, derived from the import graph: the project files its module imports, transitively.

`brainmri deps` prints them; `brainmri deps --write` puts them into dvc.yaml; tests/test_deps.py fails when dvc.yaml
differs. Written by hand over `ast` because the standard library's modulefinder also walks every third-party package
(TensorFlow alone takes minutes) and skips nothing we need: here every import statement counts, including those
inside functions, and only files of this project are followed.
"""

from __future__ import annotations

import ast
import functools
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
        params = body.setdefault("params", [])
        if not [p for p in params if isinstance(p, dict) and VERSIONS_FILE in p]:
            params.append({VERSIONS_FILE: [name]})
            changed.append(name)
        if [d for d in deps if isinstance(d, str) and d.startswith(CODE_PREFIX)] == want:
            continue
        keep = [d for d in deps if not (isinstance(d, str) and d.startswith(CODE_PREFIX))]
        deps.clear()
        deps.extend(keep + want)
        changed.append(name)
    plots = top_plots(root)
    if data.get("plots") != plots:
        data["plots"] = plots
        changed.append("plots")
    versions = versions_text(stage_versions(root, data, lock_pins(root / LOCK_FILE)))
    current = (root / VERSIONS_FILE).read_text(encoding="utf-8") if (root / VERSIONS_FILE).is_file() else None
    if current != versions:
        (root / VERSIONS_FILE).write_text(versions, encoding="utf-8")
        changed.append(VERSIONS_FILE)
    if [c for c in changed if c != VERSIONS_FILE]:
        with open(dvc_file, "w", encoding="utf-8") as f:
            yaml.dump(data, f)
    return sorted(set(changed))


# Library versions: each stage depends on the exact versions (from requirements.lock) of the distributions its code
# imports, with everything those require, so upgrading TensorFlow makes train, evaluate, export and benchmark stale
# and leaves ingest alone. They are written to versions.yaml, one mapping per stage, because DVC tracks params only
# in YAML, JSON, TOML or Python files, not in a pip lock file.
LOCK_FILE = "requirements.lock"  # exact versions every install uses (`make lock` writes it with uv pip compile)
VERSIONS_FILE = "versions.yaml"  # GENERATED by `brainmri deps --write` from the lock file; stages list it as params


def _normal(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(lock_file: Path) -> dict[str, str]:
    """{distribution: version} from a pip-style lock file (`name==version` lines)."""
    pins = {}
    for line in Path(lock_file).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            pins[_normal(name.split("[", 1)[0])] = version.strip()
    return pins


def third_party_modules(root: Path, files: list[str]) -> set[str]:
    """Top-level modules outside the project and the standard library that these project files import."""
    import sys

    root = Path(root)
    mods = {m.split(".")[0] for f in files for m in imported_modules(root, root / f)}
    return {m for m in mods if m and m not in PACKAGES and m not in sys.stdlib_module_names and m != "__future__"}


@functools.cache
def _providers() -> dict[str, list[str]]:
    from importlib import metadata

    return metadata.packages_distributions()  # scans every installed distribution: once per process


def required_distributions(modules: set[str]) -> set[str]:
    """The installed distributions that provide `modules`, and everything they require (their own extras aside)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    providers = _providers()
    todo = [d for m in modules for d in providers.get(m, [])]
    seen: set[str] = set()
    while todo:
        name = _normal(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def stage_versions(root: Path, dvc_yaml: dict, pins: dict[str, str]) -> dict[str, dict[str, str]]:
    """For each stage, {distribution: locked version} of every library its code needs."""
    out = {}
    for name, deps in expected_deps(root, dvc_yaml).items():
        files = [d.removeprefix(CODE_PREFIX) for d in deps]
        dists = required_distributions(third_party_modules(root, files))
        out[name] = {d: pins[d] for d in sorted(dists) if d in pins}
    return out


def versions_text(versions: dict[str, dict[str, str]]) -> str:
    import yaml

    head = (
        f"# GENERATED by `brainmri deps --write` from {LOCK_FILE}: per stage, the exact versions of the libraries its\n"
        "# code imports and everything they require. Stages list their entry as params, so an upgrade reruns them.\n"
    )
    return head + yaml.safe_dump(versions, sort_keys=True, default_flow_style=False)


def declared_version_params(dvc_yaml: dict) -> dict[str, list]:
    out = {}
    for name, stage in dvc_yaml["stages"].items():
        params = _stage_body(stage).get("params", [])
        out[name] = [p[VERSIONS_FILE] for p in params if isinstance(p, dict) and VERSIONS_FILE in p]
    return out


# Top-level plots: every model's test ROC overlaid in one `dvc plots show` chart, and the report's figures by name
# (its folder also holds Markdown and HTML, which DVC cannot plot). DVC has no foreach for top-level plots, so the
# list is written from params.yaml's models here.
REPORT_FIGURES = ("roc.png", "confusion_matrices.png", "training_curves.png", "samples.png", "latency.png", "reliability.png")


def top_plots(root: Path) -> list:
    from brainmri.config import read_yaml

    params = read_yaml(Path(root) / "params.yaml")
    paths = params["paths"]
    rocs = {f"{paths['eval']}/{m}/{paths['files']['roc']}": "tpr" for m in params["models"]}
    overlay = {
        "test ROC, every model": {
            "x": "fpr",
            "y": rocs,
            "template": "simple",
            "x_label": "false positive rate",
            "y_label": "true positive rate",
        }
    }
    return [overlay, *(f"{paths['report']}/{name}" for name in REPORT_FIGURES)]


def declared_plots(dvc_yaml: dict) -> list:
    return dvc_yaml.get("plots", [])
