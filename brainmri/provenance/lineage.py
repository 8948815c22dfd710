"""Where an artifact came from: the chain of DVC stages back to the raw data, as dvc.lock recorded it."""

from __future__ import annotations

import graphlib
import hashlib
import json
import os
import subprocess
from pathlib import Path

from brainmri.config import read_yaml
from brainmri.core.errors import BrainMRIError


def git_state(root: Path) -> dict:
    """The commit the workspace is at and whether tracked files differ from it."""

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"commit": None, "dirty": None, "note": "not a git repository, or no commit yet"}
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return {"commit": head.stdout.strip(), "dirty": bool(dirty)}


def md5(path: Path) -> str:
    """The hash DVC records for a file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _metric_paths(root: Path) -> dict[str, list[str]]:
    """Per stage, its outputs declared as metrics in dvc.yaml (DVC's own reading of it)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    here = os.getcwd()
    os.chdir(root)  # DVC resolves some paths against the working directory
    try:
        with Repo(".") as repo:
            return {s.name: [o.def_path for o in s.outs if o.metric] for s in repo.index.stages if s.cmd}  # not `dvc add` data
    except DvcException as exc:
        raise BrainMRIError(f"{root}: DVC cannot read this workspace's dvc.yaml: {str(exc).splitlines()[0]}") from None
    finally:
        os.chdir(here)


def read_lock(root: str | Path) -> dict:
    """dvc.lock's stages, checked to be what DVC writes; read once by a caller that asks for the lineage of several
    artifacts (it is ~0.4 s a read)."""
    from ruamel.yaml import YAMLError

    lock_file = Path(root).resolve() / "dvc.lock"
    if not lock_file.is_file():
        raise BrainMRIError(f"no dvc.lock in {Path(root).resolve()}: run `dvc repro` or `brainmri run` first, then ask for lineage")
    try:
        data = read_yaml(lock_file) or {}
    except YAMLError as exc:  # merge-conflict markers, a bad edit: one sentence, its line
        mark = getattr(exc, "problem_mark", None)
        raise BrainMRIError(
            f"{lock_file}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}; restore it (git checkout dvc.lock)"
        ) from None
    stages = data.get("stages", {}) if isinstance(data, dict) else None
    if not _is_lock(stages):
        raise BrainMRIError(f"{lock_file}: not a lock file as DVC writes it (stages with cmd, deps, outs and params); restore it")
    return stages


def _is_lock(stages) -> bool:
    """Whether `stages` has the shape of dvc.lock's: name -> {cmd: str, deps/outs: [{path: str, ...}], params: {file: {...}}}."""
    if not isinstance(stages, dict):
        return False
    for stage in stages.values():
        if not isinstance(stage, dict) or not isinstance(stage.get("cmd", ""), str | list):
            return False
        for key in ("deps", "outs"):
            entries = stage.get(key, [])
            if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("path"), str) for e in entries):
                return False
        params = stage.get("params", {})
        if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
            return False
    return True


def relative_to_project(root: Path, target: str | Path) -> str:
    """`target` as a path inside the project, as dvc.lock names it: through a symlinked data folder it is still the
    project's path (it is compared as written, then resolved); outside the project, one sentence."""
    target = Path(target)
    for base, path in ((root, Path(os.path.abspath(root / target))), (root.resolve(), (root / target).resolve())):
        if path == base or path.is_relative_to(base):
            return path.relative_to(base).as_posix()
    raise BrainMRIError(f"{target}: outside the project {root}; lineage covers what this project's stages wrote")


def lineage(root: str | Path, target: str | Path, with_metrics: bool = True, stages: dict | None = None) -> dict:
    """The stages that produced `target` and everything upstream of them, from dvc.lock (or `stages`, its
    `read_lock`), plus the git state."""
    root = Path(root).resolve()
    rel = relative_to_project(root, target)
    stages = read_lock(root) if stages is None else stages

    def producers(path: str) -> list[str]:
        return [n for n, s in stages.items() for o in s.get("outs", []) if _inside(path, o["path"]) or _inside(o["path"], path)]

    start = producers(rel)
    if not start:
        raise BrainMRIError(f"{rel}: no stage in dvc.lock has it as an output (outputs: {', '.join(_all_outs(stages))})")
    upstream, queue = {}, list(start)
    while queue:
        name = queue.pop()
        if name not in upstream:
            upstream[name] = {u for d in stages[name].get("deps", []) for u in producers(d["path"]) if u != name}
            queue += upstream[name]
    chain = []
    try:
        order = list(graphlib.TopologicalSorter(upstream).static_order())
    except graphlib.CycleError as exc:
        raise BrainMRIError(f"dvc.lock: its stages depend on each other in a cycle ({' -> '.join(exc.args[1])}); restore it") from None
    metrics = _metric_paths(root) if with_metrics else {}
    for name in reversed(order):  # the artifact first, raw data last
        s = stages[name]
        entry = {
            "stage": name,
            "cmd": s["cmd"],
            "params": {k: v for f in s.get("params", {}).values() for k, v in f.items()},
            "deps": [{"path": d["path"], "md5": d.get("md5")} for d in s.get("deps", [])],
            "outs": [{"path": o["path"], "md5": o.get("md5")} for o in s.get("outs", [])],
        }
        if with_metrics:
            entry["metrics"] = {m: json.loads((root / m).read_text()) for m in metrics.get(name, []) if (root / m).is_file()}
        chain.append(entry)
    out = next(o for o in stages[start[0]].get("outs", []) if _inside(rel, o["path"]) or _inside(o["path"], rel))
    current = md5(root / rel) if (root / rel).is_file() else None
    return {
        "target": rel,
        "recorded_md5": out.get("md5") if out["path"] == rel else None,
        "current_md5": current,
        "matches_dvc_lock": current is not None and current == out.get("md5"),
        "git": git_state(root),
        "chain": chain,
    }


def _all_outs(stages: dict) -> list[str]:
    return sorted(o["path"] for s in stages.values() for o in s.get("outs", []))


def _flat(d, prefix: str = "") -> list[str]:
    """key=value for every scalar in a nested metrics dict (lists summarised)."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flat(v, key + ".")
        elif isinstance(v, list):
            out.append(f"{key}=[{len(v)} items]")
        else:
            out.append(f"{key}={v}")
    return out


def render(info: dict, max_metrics: int = 12) -> str:
    """The lineage as text, artifact first, raw data last."""
    g = info["git"]
    commit = g["commit"] or g.get("note")
    lines = [
        f"{info['target']}  md5 {info['current_md5'] or 'n/a'}  "
        + ("(matches dvc.lock)" if info["matches_dvc_lock"] else "(NOT what dvc.lock recorded: rerun `dvc repro`)"),
        f"git commit {commit}" + (" with uncommitted changes" if g.get("dirty") else ""),
    ]
    for e in info["chain"]:
        lines += ["", f"stage {e['stage']}: {e['cmd']}"]
        lines += [f"  param {k} = {json.dumps(v, sort_keys=True)}" for k, v in e["params"].items()]
        lines += [f"  dep   {d['path']}  md5 {d['md5']}" for d in e["deps"]]
        lines += [f"  out   {o['path']}  md5 {o['md5']}" for o in e["outs"]]
        for path, m in e.get("metrics", {}).items():
            flat = _flat(m) if isinstance(m, dict) else [str(m)]
            more = f" (+{len(flat) - max_metrics} more)" if len(flat) > max_metrics else ""
            lines.append(f"  metrics {path}: {', '.join(flat[:max_metrics])}{more}")
    return "\n".join(lines)
