"""The end of every flow run: record what it produced, then promote the retrained model only if it is not worse.

- Record: `dvc exp save` of the workspace (dvc.lock, params, metrics, the registry), pushed to the git and DVC remotes
  when they are configured. A workspace without git is recorded in the registry only.
- Promote: the served model (paths.served) and the retrained one are scored on the current validation split, which
  neither trained on (splits stay put as data grows). The retrained model replaces the served one only when the lower
  end of the paired group-bootstrap 95% interval of their AUC difference stays above -promotion.margin. The test split
  is for reporting, never for this gate. Either way the registry (paths.registry) gets an entry saying why.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from brainmri.config import Params
from brainmri.core.files import atomic_path, write_json
from brainmri.provenance.lineage import git_state, md5

log = logging.getLogger("brainmri")
SERVED = "model.onnx"  # the served model's file name inside paths.served


def read_registry(p: Params) -> dict:
    path = p.path("registry")
    if not path.is_file():
        return {"served": None, "runs": []}
    return json.loads(path.read_text())


def score(p: Params, onnx_file: Path, paths: list[Path]) -> np.ndarray:
    """Tumour probabilities (n,), or class probabilities (n, K), from an exported model, with the one preprocessing
    path (no TensorFlow)."""
    from brainmri.deploy.onnxrt import metadata, probabilities, session
    from brainmri.intake.preprocess import load_batch

    sess = session(onnx_file, p.benchmark.threads)
    size = int(metadata(sess)["input_size"])
    return probabilities(sess, load_batch(paths, size))


def decide(p: Params, candidate: Path, served: Path | None) -> dict:
    """Compare the candidate with the served model on the validation split; return the decision and its numbers."""
    from brainmri.intake.parts import split_part
    from brainmri.stats.metrics import paired_auc_differences

    if served is None or not served.is_file():
        return {"promote": True, "reason": "no model is served yet"}
    va = split_part(p, "val")
    groups = va.frame["group"].to_numpy()
    probs = {"candidate": score(p, candidate, va.paths), "served": score(p, served, va.paths)}
    if probs["candidate"].shape != probs["served"].shape:  # the classes changed (another dataset): nothing to compare
        shapes = f"{probs['served'].shape[1:] or '(one probability)'} against {probs['candidate'].shape[1:] or '(one probability)'}"
        return {"promote": True, "reason": f"the served model answers another question (outputs {shapes}): replaced"}
    if probs["candidate"].ndim == 2:  # N classes: the macro one-vs-rest AUC, paired the same way
        from brainmri.stats.multiclass import paired_auc_differences as paired_macro

        diff = paired_macro(va.y, probs, "served", groups, p.promotion.bootstrap, p.seed)["candidate"]
    else:
        diff = paired_auc_differences(va.y, probs, "served", groups, p.promotion.bootstrap, p.seed)["candidate"]
    ok = diff["ci_low"] > -p.promotion.margin
    kind = "macro AUC" if probs["candidate"].ndim == 2 else "AUC"
    why = (
        f"val {kind} difference {diff['value']:+.3f} [95% CI {diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}] over {len(va.y)} images "
        f"in {len(set(groups))} duplicate groups: the lower end is {'above' if ok else 'at or below'} -{p.promotion.margin}"
    )
    return {"promote": bool(ok), "reason": why, "val_auc_difference": diff, "n_val": len(va.y)}


def _git(root: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=120)


def _dvc(root: Path, *args) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, timeout=1800)


def save_experiment(p: Params, name: str) -> dict:
    """`dvc exp save` the workspace as experiment `name`; push it and the data when remotes are configured."""
    root = Path(p.root)
    if not p.promotion.save_experiment:
        return {"saved": False, "note": "promotion.save_experiment is off"}
    if _git(root, "rev-parse", "HEAD").returncode != 0:
        return {"saved": False, "note": "not a git repository with a commit: recorded in the registry only"}
    untracked = [f for f in ("dvc.lock", p.paths.registry) if (root / f).is_file()]
    args = ["exp", "save", "-n", name, "-f", *[a for f in untracked for a in ("-I", f)]]
    res = _dvc(root, *args)
    if res.returncode != 0:
        return {"saved": False, "note": f"dvc exp save failed: {(res.stderr or res.stdout).strip()[-300:]}"}
    out = {"saved": True, "experiment": name}
    if _dvc(root, "remote", "default").returncode == 0:  # it exits 1 ("No default remote set") without one
        push = _dvc(root, "push")
        out["dvc_push"] = "ok" if push.returncode == 0 else (push.stderr or push.stdout).strip()[-300:]
    remotes = _git(root, "remote").stdout.split()
    if remotes:
        push = _dvc(root, "exp", "push", remotes[0], name)
        out["git_push"] = f"{remotes[0]}: " + ("ok" if push.returncode == 0 else (push.stderr or push.stdout).strip()[-300:])
    return out


def install(p: Params, candidate: Path, model: str) -> None:
    """Copy the candidate, and its model card when there is one, in as the served model."""
    served_dir = p.path("served")
    served_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(served_dir / SERVED) as tmp:
        shutil.copyfile(candidate, tmp)
    card = p.model_file("eval", model, "card")
    if card.is_file():
        with atomic_path(served_dir / "model_card.json") as tmp:
            shutil.copyfile(card, tmp)


def promote(p: Params, run_name: str, stages: dict) -> dict:
    """Decide, install the candidate as the served model if it wins, and record the run in the registry."""
    registry = read_registry(p)
    model = p.promotion.model
    candidate = p.model_file("export", model, "onnx")
    served = p.path("served") / SERVED if registry["served"] else None
    decision = decide(p, candidate, served)
    entry = {
        "run": run_name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model,
        "candidate_md5": md5(candidate),
        "git": git_state(Path(p.root)),
        "stages_run": sorted(s for s, r in stages.items() if r.get("ran")),
        **decision,
    }
    if decision["promote"]:
        version = 1 + max((r.get("version", 0) for r in registry["runs"]), default=0)
        entry["version"] = version
        install(p, candidate, model)
        registry["served"] = {"version": version, "stage": "production", "run": run_name, "model": model, "md5": entry["candidate_md5"]}
    registry["runs"].append(entry)
    write_json(p.path("registry"), registry)
    entry["record"] = save_experiment(p, run_name)
    registry["runs"][-1] = entry
    write_json(p.path("registry"), registry)  # the push outcome too (the saved experiment holds the entry without it)
    verdict = f"promoted as version {entry['version']}" if decision["promote"] else "NOT promoted"
    log.info("promotion %s: %s %s: %s", run_name, model, verdict, decision["reason"])
    return entry
