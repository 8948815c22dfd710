"""Scenario tests: `dvc repro` and the Prefect flow are one system, on small phantoms in a git + DVC workspace.

The tests share one workspace and run in file order: each starts from the state the previous one left.
"""

import asyncio
import json
import os
import re
import shutil
import subprocess
import time

import pandas as pd
import pytest
import yaml
from factory import SHARED_DATA, brain, encode, make_project, materialise_weights, tiny_training

from brainmri.config import load_params
from brainmri.provenance.lineage import md5

pytestmark = pytest.mark.slow

TINY = tiny_training(epochs=2)
TINY["backbones"]["vgg16"]["weights"] = "weights/small.weights.h5"  # a local file (the fixture writes it): a file's replacement is tested
SMALL = {
    **TINY,
    "ingest": {"source": "data/raw/synthetic", "max_side": 96},
    "synthetic": {"n_per_class": 12, "min_size": 64, "max_size": 96},
    "augment": {"copies": 1},
    "orchestration": {"max_workers": 2, "retries": 1, "retry_delay": 0},
}
MODELS = {
    "vgg16-aug": {"backbone": "vgg16", "augment": True},
    "smallcnn-aug": {"backbone": "smallcnn", "augment": True},
}
PER_MODEL = ("train", "evaluate", "export", "benchmark", "external", "saliency")
WEIGHTS = [f"weights@{b}" for b in ("resnet50v2", "vgg19", "vgg16", "smallcnn")]  # every backbone in params
DATA = ["ingest", "audit", "split", "augment", "ingest_external"]
CHAIN = [*DATA, *WEIGHTS, *(f"{stage}@{m}" for m in MODELS for stage in PER_MODEL), "ensemble", "report"]
VGG16_CHAIN = sorted([f"{stage}@vgg16-aug" for stage in PER_MODEL] + ["ensemble", "report"])  # ensemble reads every model
GIT = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
TIMES = {}


def sh(cwd, *cmd, ok=True):
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, **GIT})
    assert res.returncode == 0 or not ok, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def repro(root) -> list[str]:
    """`dvc repro`, returning the stages it ran."""
    return re.findall(r"Running stage '([^']+)'", sh(root, "dvc", "repro"))


def flow(root) -> list[str]:
    """The Prefect flow in this process (under the test harness), returning the stages it ran."""
    from flows.pipeline import pipeline

    result = pipeline(str(root / "params.yaml"))
    assert set(result) == set(CHAIN)
    return [s for s, r in result.items() if r["ran"]]


def set_param(root, section, key, value):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value if section != "backbones" else {**params[section][key], **value}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def held(message: str) -> set[str]:
    """The stages a failure summary says were held back."""
    return set(re.search(r"held back by them: ([^\n]+)", message).group(1).split(", "))


def clean(root) -> bool:
    return "Data and pipelines are up to date" in sh(root, "dvc", "status")


@pytest.fixture(scope="module")
def ws(tmp_path_factory, prefect_harness):
    """A git + DVC workspace with the code, params and dvc.yaml, and phantom raw data tracked by `dvc add`."""
    from test_weights import small_vgg16_weights

    root = make_project(tmp_path_factory.mktemp("ws"), SMALL, code=True, replace={"models": MODELS})
    small_vgg16_weights(root / "weights" / "small.weights.h5", seed=1)  # vgg16 starts from a local weights file
    sh(root, "brainmri", "synthesize")
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    sh(root, "dvc", "add", "-q", "data/raw/synthetic", "weights/small.weights.h5")  # versioned: a clone can `dvc pull` both
    (root / ".gitignore").write_text("__pycache__/\n")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "workspace")
    return root


# a stage process run inside this wrapper appends (stage, start, end) to a file: the spans of a run that fails
SPAN = "import json, os, subprocess, sys, time; t = time.time(); rc = subprocess.call(sys.argv[3:]); "
SPAN += "open(sys.argv[1], 'a').write(json.dumps([sys.argv[2], t, time.time(), os.environ.get('BRAINMRI_THREADS')]) + '\\n'); sys.exit(rc)"
HELD_BACK = ("evaluate@vgg16-aug", "benchmark@vgg16-aug", "external@vgg16-aug", "ensemble", "report")  # downstream of export


def running_command(root, *words: str) -> bool:
    """Whether a process in `root` is running the stage command `brainmri WORDS` (DVC runs it through a shell)."""
    import psutil

    for proc in psutil.process_iter(["cmdline", "cwd"]):
        line = " ".join(proc.info["cmdline"] or [])
        if proc.info["cwd"] == os.path.realpath(root) and " ".join(("brainmri", *words)) in line and "dvc" not in line:
            return True
    return False


def _check_overlap_and_timing_lock(root, spans, holds_log, calls: list[str]) -> None:
    """Checks the first flow run's stage spans and timing-lock holds: the two branches' training overlaps, every stage
    command held the lock shared, and no stage process worked beside a timing stage or the benchmark's timed calls."""
    lines = [json.loads(line) for line in spans.read_text().splitlines()]
    span = {stage: (t0, t1) for stage, t0, t1, _ in lines}
    exclusive = load_params(root / "params.yaml").orchestration.exclusive
    share = str(max(1, len(os.sched_getaffinity(0)) // 2))  # max_workers 2: each stage process held to half the cores
    assert {s: t for s, *_, t in lines} == {s: None if s.split("@")[0] in exclusive else share for s, *_ in lines}
    holds = [json.loads(line) for line in holds_log.read_text().splitlines()]  # brainmri/core/timing_lock.py's log
    timing, working = [h for h in holds if h["kind"] == "alone"], [h for h in holds if h["kind"] == "shared"]
    command: dict[str, tuple] = {}  # each stage command's span: from its first hold to its last (a timing one lets go meanwhile)
    for h in (h for h in working if h["argv"][0] == "brainmri"):
        t0, t1 = command.get("@".join(h["argv"][1:3]), (h["start"], h["end"]))
        command["@".join(h["argv"][1:3])] = (min(t0, h["start"]), max(t1, h["end"]))
    (a0, a1), (b0, b1) = command["train@vgg16-aug"], command["train@smallcnn-aug"]
    assert a0 < b1 and b0 < a1, command  # max_workers 2: the two branches' training commands overlap
    ran = set(calls) - {"export@vgg16-aug"}  # every stage of this first run ran, but the injected failure
    assert ran <= command.keys()  # each stage command held the timing lock shared
    assert timing and all(w["end"] <= t["start"] or w["start"] >= t["end"] for t in timing for w in working)
    alone = [s for s in span if s.split("@")[0] in exclusive]
    assert alone and all(span[s][1] <= span[o][0] or span[o][1] <= span[s][0] for s in alone for o in span if o != s), span
    w0, w1 = json.loads((root / "data/benchmark/smallcnn-aug/benchmark.json").read_text())["timed"]["window"]
    assert any(t["start"] <= w0 <= w1 <= t["end"] for t in timing)  # its timed calls ran while no stage process worked


def test_a_first_flow_run_overlaps_branches_and_a_failed_branch_does_not_stop_the_others(ws, monkeypatch, tmp_path):
    """The first run on the workspace: the two model branches' commands overlap (max_workers 2), no other stage
    process works beside a timing stage; one branch's export fails and the others finish; a user's `dvc repro` of a
    stage the flow is running meanwhile stops on DVC's lock without running anything, and nothing is corrupted."""
    import sys
    import threading

    import flows.stage_process as sp
    from brainmri.core import timing_lock
    from flows.pipeline import PipelineFailed, run

    real, calls, spans = sp.repro_command, [], tmp_path / "spans.jsonl"

    def broken_export(stage, pull):
        calls.append(stage)
        if stage == "export@vgg16-aug":  # a stage process that dies as a full disk would make it
            return [sys.executable, "-c", "import sys; print('injected: disk went away', file=sys.stderr); sys.exit(1)"]
        return [sys.executable, "-c", SPAN, str(spans), stage, *real(stage, pull)]

    monkeypatch.setattr(sp, "repro_command", broken_export)
    monkeypatch.setenv(timing_lock.LOG, str(tmp_path / "holds.jsonl"))  # every stage command logs its holds of the timing lock
    meanwhile = {}

    def impatient():  # a user's `dvc repro` of the stage the flow is running: DVC's own locks stop it at once
        end = time.monotonic() + 600
        while not running_command(ws, "train", "vgg16-aug") and time.monotonic() < end:
            time.sleep(0.2)
        meanwhile["res"] = subprocess.run(["dvc", "repro", "train@vgg16-aug"], cwd=ws, capture_output=True, text=True, timeout=300)

    t = threading.Thread(target=impatient)
    t.start()
    with pytest.raises(PipelineFailed) as err:
        run(str(ws / "params.yaml"))
    t.join()
    res = meanwhile["res"]
    out = res.stdout + res.stderr
    assert "Running stage" not in out and (res.returncode == 0 or "busy" in out or "lock" in out.lower()), out
    _check_overlap_and_timing_lock(ws, spans, tmp_path / "holds.jsonl", calls)
    msg = str(err.value)
    assert "export@vgg16-aug" in msg and "injected: disk went away" in msg
    assert held(msg) == set(HELD_BACK) and "next:" in msg
    assert sorted(calls) == sorted([s for s in CHAIN if s not in HELD_BACK] + ["export@vgg16-aug"])
    assert calls.count("export@vgg16-aug") == 2  # retried once (orchestration.retries), then failed
    status = sh(ws, "dvc", "status")
    for stage in ("ingest", "augment", "train@vgg16-aug", "train@smallcnn-aug", "export@smallcnn-aug", "benchmark@smallcnn-aug"):
        assert f"{stage}:" not in status  # finished and recorded in dvc.lock


def test_dvc_repro_runs_what_failed_and_was_held_back_then_the_flow_reruns_nothing(ws):
    assert sorted(repro(ws)) == sorted(["export@vgg16-aug", *HELD_BACK])
    lock = (ws / "dvc.lock").read_bytes()
    start = time.monotonic()
    assert repro(ws) == []
    TIMES["no-op dvc repro"] = time.monotonic() - start
    start = time.monotonic()
    assert flow(ws) == []
    TIMES["no-op flow"] = time.monotonic() - start
    assert (ws / "dvc.lock").read_bytes() == lock and clean(ws)
    print(f"\nno-op dvc repro {TIMES['no-op dvc repro']:.1f} s, no-op flow {TIMES['no-op flow']:.1f} s")


def test_dvc_metrics_plots_and_exp_show_read_cleanly(ws):
    sh(ws, "brainmri", "deps", "--write")  # top-level plots for this workspace's two models
    metrics = json.loads(sh(ws, "dvc", "metrics", "show", "--json"))
    flat = [v for rev in metrics.values() for f in rev["data"].values() for v in f["data"].values()]
    assert flat and all(v is None or isinstance(v, (int, float)) for v in flat)  # numbers only: no config, no strings
    out = sh(ws, "dvc", "plots", "show", "-o", str(ws / "dvc_plots_out"))
    assert "failed" not in out.lower() and (ws / "dvc_plots_out" / "index.html").is_file()
    html = (ws / "dvc_plots_out" / "index.html").read_text()
    assert "test ROC, every model" in html and all(f'"filename": "{m}/roc.csv"' in html for m in MODELS)  # one series each
    shutil.rmtree(ws / "dvc_plots_out")
    sh(ws, "git", "add", "-A")
    sh(ws, "git", "commit", "-qm", "first run")
    table = sh(ws, "dvc", "exp", "show", "--csv")
    header = table.splitlines()[0]
    for m in MODELS:
        assert f"data/eval/{m}/scores.json:test_auc" in header
    assert "cv_auc_pooled_out_of_fold" in header  # DVC drops the file from a column name only one file has


@pytest.mark.long  # two flow runs and a restore: 280 s of CI's budget; run-cache restore is DVC's own (make test-all)
def test_a_vgg16_learning_rate_change_reruns_exactly_its_chain_and_going_back_restores_it_without_running(ws):
    from flows.pipeline import pipeline

    model = ws / "data/models/vgg16-aug/model.keras"
    a, lr_a = model.read_bytes(), load_params(ws / "params.yaml").backbones["vgg16"].learning_rate
    set_param(ws, "backbones", "vgg16", {"learning_rate": 0.002})  # B
    result = pipeline(str(ws / "params.yaml"))
    assert sorted(s for s, r in result.items() if r["ran"]) == VGG16_CHAIN
    assert any("params.yaml" in r for r in result["train@vgg16-aug"]["reasons"])  # DVC's reason, in the task's record
    assert repro(ws) == [] and clean(ws)  # the flow left the dvc.lock `dvc repro` would have
    b = model.read_bytes()
    assert b != a

    set_param(ws, "backbones", "vgg16", {"learning_rate": lr_a})  # back to A: `dvc repro` restores A from the run cache
    out = sh(ws, "dvc", "repro")
    assert "Running stage" not in out and sorted(set(re.findall(r"Stage '([^']+)' is cached", out))) == VGG16_CHAIN, out
    assert model.read_bytes() == a and clean(ws)  # clean: the flow, which runs what `dvc status` finds stale, has nothing to do

    set_param(ws, "backbones", "vgg16", {"learning_rate": 0.002})  # B again: the flow restores B the same way
    result = pipeline(str(ws / "params.yaml"))
    assert [s for s, r in result.items() if r["ran"]] == []  # no stage command ran...
    assert sorted(s for s, r in result.items() if r["restored"]) == VGG16_CHAIN  # ...DVC restored B's outputs
    assert model.read_bytes() == b and clean(ws)


def test_editing_the_files_a_stage_imports_makes_exactly_their_importers_stale(ws):
    """The files are grouped by the stages that import them; each group is edited at once (one `dvc status` per
    group, not per file: tests/test_deps.py checks that dvc.yaml lists exactly each stage's imports)."""
    from dvc.repo import Repo

    from brainmri.config import read_yaml
    from brainmri.provenance import codedeps

    expected = codedeps.expected_deps(ws, read_yaml(ws / "dvc.yaml"))
    files = sorted({d.removeprefix(codedeps.CODE_PREFIX) for deps in expected.values() for d in deps})
    by_importers: dict[frozenset, list[str]] = {}
    for rel in files:
        by_importers.setdefault(frozenset(s for s, deps in expected.items() if codedeps.CODE_PREFIX + rel in deps), []).append(rel)
    glue = [*(f"flows/{m}.py" for m in ("pipeline", "stage_process", "workspace", "scheduler", "cli")), "brainmri/provenance/codedeps.py"]
    cases = [*by_importers.items(), (frozenset(), glue)]
    assert len(cases) > 5 and sum(len(g) for _, g in cases) == len(files) + len(glue)
    here = os.getcwd()
    os.chdir(ws)
    try:
        for want, group in cases:
            originals = {rel: (ws / rel).read_bytes() for rel in group}
            for rel, data in originals.items():
                (ws / rel).write_bytes(data + b"\n# edited\n")
            try:
                with Repo(".") as repo:
                    stale = {name.split("@")[0] for name in repo.status()}
            finally:
                for rel, data in originals.items():
                    (ws / rel).write_bytes(data)
            assert stale == set(want), (group, stale, want)
    finally:
        os.chdir(here)
    assert clean(ws)


@pytest.mark.long
def test_a_flow_and_a_dvc_repro_at_once_both_end_cleanly_and_never_run_the_same_stage(ws):
    """A user's `dvc --wait-for-lock repro` and the flow at once: the flow's `dvc status` waits while the user's repro
    is inside a stage (DVC's read/write locks), and a user's repro that meets a stage the flow runs stops on them;
    between them every stale stage runs once and the workspace ends clean."""
    from flows.pipeline import pipeline

    set_param(ws, "train", "threshold", 0.4)  # a value never run before: no run-cache entry to restore
    # saliency reads only model.keras, which a threshold leaves byte for byte the same: it is not stale
    stale = {s for s in CHAIN if s.startswith(("train@", "evaluate@", "export@", "benchmark@", "external@"))}
    stale |= {"ensemble", "report"}
    user = subprocess.Popen(["dvc", "--wait-for-lock", "repro"], cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = pipeline(str(ws / "params.yaml"))
    out, _ = user.communicate(timeout=900)
    assert user.returncode == 0 or "is busy, it is being blocked by" in out, out
    by_user = set(re.findall(r"Running stage '([^']+)'", out))
    by_flow = {s for s, r in result.items() if r["ran"]}
    assert not by_user & by_flow and by_user | by_flow == stale, (by_user, by_flow)
    assert clean(ws)


def test_a_tampered_output_is_seen_by_its_hash_and_put_back_from_dvcs_cache(ws):
    model = ws / "data/models/vgg16-aug/model.keras"
    original = model.read_bytes()
    model.write_bytes(original[:-100] + b"\0" * 100)
    status = sh(ws, "dvc", "status")
    assert "modified" in status and "model.keras" in status
    out = sh(ws, "dvc", "repro")
    assert "Running stage" not in out  # not retrained: the recorded model comes back from the cache, verified by hash
    assert model.read_bytes() == original and clean(ws)


def test_new_images_make_every_stage_but_the_weights_stale_for_the_flow(ws):
    """New scans in the source folder: DVC finds ingest changed, and the flow's one `dvc status` leaves only the
    weights stages (which feed on nothing that changed) out of its run; removing the scans makes the workspace clean."""
    from flows import workspace

    new = [ws / "data/raw/synthetic" / cls / f"new scan {i}.jpg" for i, cls in enumerate(("no", "yes"))]
    for i, path in enumerate(new):
        path.write_bytes(encode(brain(900 + i, "yes" in path.parent.name), "JPEG"))
    try:
        assert "ingest:" in sh(ws, "dvc", "status")
        state = workspace.read(ws)
        assert state["current"] == sorted(WEIGHTS) and "data/raw/synthetic" in " ".join(state["reasons"]["ingest"])
    finally:
        for path in new:
            path.unlink()
    assert clean(ws)


def test_a_failed_run_ends_in_one_summary_without_traceback_and_keeps_what_was_produced(ws):
    """`brainmri run` as a user without a Prefect server runs it: Prefect's temporary server starts once, beside DVC's
    reading of the workspace (flows.prefect_setup.start_server_beside), and the flow uses it."""
    manifest = (ws / "data/ingest/manifest.csv").read_bytes()
    set_param(ws, "ingest", "min_images_per_class", 1000)  # bad data for these params: ingest exits 2
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | GIT
    try:
        res = subprocess.run(["brainmri", "run"], cwd=ws, capture_output=True, text=True, timeout=600, env=env)
    finally:
        set_param(ws, "ingest", "min_images_per_class", 5)
    err = res.stdout + res.stderr
    assert res.returncode == 2, err
    assert err.count("Prefect: a temporary server for this run at http://127.0.0.1:") == 1, err  # started by `run`
    assert "Traceback" not in err and "1 stage(s) failed" in err and "ingest failed (exit code 2)" in err
    assert {"audit", "split", "ingest_external"} <= held(err) and "next:" in err and "Finished in state" not in err
    assert (ws / "data/ingest/manifest.csv").read_bytes() == manifest  # DVC's removed outputs are put back
    assert clean(ws)


def test_the_flow_publishes_its_tables_as_artifacts(ws):
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return {a.key: a for a in await client.read_artifacts()}

    artifacts = asyncio.run(read())
    assert "| Model |" in artifacts["results-table"].data and "vgg16-aug" in artifacts["results-table"].data
    assert "ORT fp32 ms" in artifacts["latency-table"].data
    assert not any("file://" in str(a.data) for a in artifacts.values())  # reads the same from a remote UI


@pytest.mark.long
def test_a_local_weights_file_replaced_in_place_reruns_weights_and_the_chain_that_uses_it(ws):
    from test_weights import small_vgg16_weights

    from flows.pipeline import pipeline

    before = json.loads((ws / "data/weights/vgg16/source.json").read_text())
    assert before["kind"] == "file"
    small_vgg16_weights(ws / "weights" / "small.weights.h5", seed=2)  # same name, other weights
    assert "weights@vgg16:" in sh(ws, "dvc", "status")
    result = pipeline(str(ws / "params.yaml"))
    # every weights stage depends on the inbox, so all rerun; only vgg16's copy changes, so only its chain follows
    assert sorted(s for s, r in result.items() if r["ran"]) == sorted([*WEIGHTS, *VGG16_CHAIN])
    record = json.loads((ws / "data/weights/vgg16/source.json").read_text())
    card = json.loads((ws / "data/eval/vgg16-aug/model_card.json").read_text())
    assert record["sha256"] != before["sha256"] and card["weights"]["sha256"] == record["sha256"] and card["weights"]["kind"] == "file"
    sh(ws, "dvc", "add", "-q", "weights/small.weights.h5")  # the new file versioned, so a clone can `dvc pull` it too
    assert "weights@vgg16:" in sh(ws, "dvc", "status")  # the inbox now holds the file's new .dvc
    assert sorted(flow(ws)) == sorted(WEIGHTS) and clean(ws)  # their copies are byte-identical: nothing downstream reruns


def test_lineage_of_an_exported_model_goes_back_to_the_data_manifest(ws):
    sh(ws, "git", "add", "-A")
    sh(ws, "git", "commit", "-qm", "results")
    head = sh(ws, "git", "rev-parse", "HEAD").strip()
    info = json.loads(sh(ws, "brainmri", "lineage", "data/export/vgg16-aug/model.onnx", "--json"))
    assert info["git"] == {"commit": head, "dirty": False} and info["matches_dvc_lock"]
    chain = {e["stage"]: e for e in info["chain"]}
    assert list(chain)[0] == "export@vgg16-aug" and list(chain)[-1] == "ingest"
    assert {"train@vgg16-aug", "augment", "split", "weights@vgg16"} <= set(chain) and "evaluate@vgg16-aug" not in chain  # downstream
    weights_out = next(o for o in chain["weights@vgg16"]["outs"] if o["path"] == "data/weights/vgg16")
    assert weights_out["md5"] and any(d["path"] == "data/weights/vgg16" for d in chain["train@vgg16-aug"]["deps"])
    manifest = next(o for o in chain["ingest"]["outs"] if o["path"] == "data/ingest/manifest.csv")
    assert manifest["md5"] == md5(ws / "data/ingest/manifest.csv")
    lr = load_params(ws / "params.yaml").backbones["vgg16"].learning_rate
    assert chain["train@vgg16-aug"]["params"]["backbones.vgg16"]["learning_rate"] == lr
    assert chain["train@vgg16-aug"]["params"]["train.batch_size"] == 32
    assert 0 <= chain["train@vgg16-aug"]["metrics"]["data/models/vgg16-aug/dvclive/metrics.json"]["val_auc"] <= 1
    text = sh(ws, "brainmri", "lineage", "data/export/vgg16-aug/model.onnx")
    assert f"git commit {head}" in text and "param backbones.vgg16" in text and "data/ingest/manifest.csv  md5" in text

    card = json.loads((ws / "data/eval/vgg16-aug/model_card.json").read_text())
    assert card["weights"]["kind"] == "file" and card["metrics"]["parity"]["labels_identical"]
    assert card["feature_precision"] == "fp32"  # params.yaml's default: the features the head trained on were fp32
    assert card["files"]["onnx"]["md5"] == md5(ws / "data/export/vgg16-aug/model.onnx")
    assert [e["stage"] for e in card["lineage"]["chain"]][:2] == ["export@vgg16-aug", "train@vgg16-aug"]
    assert card["lineage"]["matches_dvc_lock"]
    assert "not a medical device" in card["intended_use"]
    from importlib import metadata

    assert card["libraries"]["keras"] == metadata.version("keras") and "onnxruntime" in card["libraries"]
    assert "no stage in dvc.lock has it as an output" in sh(ws, "brainmri", "lineage", "params.yaml", ok=False)


def serve_once(deployment):
    """One scheduled run of the served deployment, picked up and executed as `brainmri serve` does."""
    from prefect.client.orchestration import get_client
    from prefect.runner import Runner

    async def run():
        runner = Runner(name="test-serve", limit=1, query_seconds=1)
        dep_id = await runner.add_deployment(deployment)
        async with get_client() as client:
            dep = await client.read_deployment(dep_id)
            flow_run = await client.create_flow_run_from_deployment(dep_id)
            await runner.start(run_once=True)
            return dep, await client.read_flow_run(flow_run.id)

    return asyncio.run(run())


def test_scheduled_runs_train_nothing_on_unchanged_inputs_and_promote_only_a_model_that_is_not_worse(ws):
    from flows.serve import retraining

    o = load_params(ws / "params.yaml").orchestration
    deployment = retraining(str(ws / "params.yaml"), o.cron, None, o.timezone)
    lock, model = (ws / "dvc.lock").read_bytes(), (ws / "data/models/vgg16-aug/model.keras").stat().st_mtime_ns

    dep, run = serve_once(deployment)  # 1: unchanged inputs, nothing served yet
    assert [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules] == [("0 3 * * 1", "UTC")]
    assert dep.parameters == {"params_path": str((ws / "params.yaml").resolve()), "promote": True}
    assert dep.global_concurrency_limit.limit == 1  # the server keeps a deployment's limit as a concurrency limit
    assert run.state.is_completed(), run.state
    assert (ws / "dvc.lock").read_bytes() == lock and (ws / "data/models/vgg16-aug/model.keras").stat().st_mtime_ns == model
    registry = json.loads((ws / "registry.json").read_text())
    first = registry["runs"][-1]
    assert first["promote"] and first["version"] == 1 and first["reason"] == "no model is served yet"
    assert first["record"]["saved"], first["record"]  # dvc exp save of the run
    assert (ws / "served/model.onnx").read_bytes() == (ws / "data/export/vgg16-aug/model.onnx").read_bytes()
    assert first["run"] in sh(ws, "dvc", "exp", "list", "--name-only")

    # 2: the same candidate with the default margin is not worse than the served model: promoted as version 2 (a gate
    # that rejects, with a zero margin or a worse candidate, is tests/test_promote.py's, on the same decide())
    _, run = serve_once(retraining(str(ws / "params.yaml"), o.cron, None, o.timezone))
    assert run.state.is_completed(), run.state
    second = json.loads((ws / "registry.json").read_text())
    assert second["runs"][-1]["promote"] and second["runs"][-1]["stages_run"] == [] and second["served"]["version"] == 2
    assert (ws / "served/model.onnx").read_bytes() == (ws / "data/export/vgg16-aug/model.onnx").read_bytes()
    text = sh(ws, "brainmri", "lineage", "served/model.onnx")
    assert second["runs"][-1]["run"] in text and "version 2" in text


def test_dvc_push_then_pull_and_repro_in_another_clone_reruns_nothing(ws, tmp_path):
    sh(ws, "dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"))
    sh(ws, "dvc", "push", "-q")
    sh(ws, "git", "add", "-A")
    sh(ws, "git", "commit", "-qm", "data and results")
    other = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(ws), str(other))
    sh(other, "dvc", "pull", "-q")
    assert clean(other) and repro(other) == []
    assert (other / "data/export/vgg16-aug/model.onnx").read_bytes() == (ws / "data/export/vgg16-aug/model.onnx").read_bytes()
    weights = "data/weights/vgg16/weights.weights.h5"  # an air-gapped machine gets the weights from the remote
    assert (other / weights).read_bytes() == (ws / weights).read_bytes()


def test_branches_run_on_a_dask_cluster_when_params_ask(ws):
    pytest.importorskip("prefect_dask")
    set_param(ws, "orchestration", "task_runner", "dask")
    try:
        assert flow(ws) == []
    finally:
        set_param(ws, "orchestration", "task_runner", "thread")


def test_prefect_yaml_deploys_this_flow_on_the_params_schedule():
    from factory import REPO
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    assert load_flow_from_entrypoint(str(REPO / dep["entrypoint"])).name == "brainmri-pipeline"
    o = load_params(REPO / "params.yaml").orchestration
    assert dep["schedules"] == [{"cron": o.cron, "timezone": o.timezone, "active": True}]
    assert dep["concurrency_limit"] == 1 and dep["parameters"]["promote"] is True
    scripts = [step["prefect.deployments.steps.run_shell_script"]["script"] for step in spec["pull"][1:]]
    assert scripts[0].startswith("git pull") and scripts[1].startswith("dvc pull")


@pytest.mark.long
def test_whole_chain_on_the_real_dataset_at_32px(tmp_path):
    """Every stage and all seven models on the 253 real images, random weights, tiny size: CI's end-to-end check."""
    from tasks.augment import augment
    from tasks.evaluate import evaluate
    from tasks.ingest import ingest
    from tasks.report import report
    from tasks.saliency import saliency
    from tasks.split import split
    from tasks.train import train

    over = {**tiny_training(epochs=3), "ingest": {"source": str(SHARED_DATA), "max_side": 96}, "augment": {"copies": 1}}
    p = load_params(make_project(tmp_path, over) / "params.yaml")
    assert ingest(p)["n_ingested"] == 253
    split(p)
    augment(p)
    materialise_weights(p)
    from tasks.export import export
    from tasks.external import external
    from tasks.ingest_external import ingest_external

    ingest_external(p)  # no external set: the report says so
    for name in p.models:
        t = train(p, name)
        export(p, name)
        m = evaluate(p, name)
        assert external(p, name)["n_images"] == 0
        assert m["n_test"] == 38 and 0.0 <= m["test"]["auc"]["value"] <= 1.0
        assert t["weights"]["kind"] == "none"
        saliency(p, name)
    table = report(p)["table"]
    assert len(table) == 7 and len(p.models) == 7
    assert "38 images" in (p.path("report") / "report.md").read_text()

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "zero.jpg").write_bytes(b"")
    onnx = str(p.model_file("export", "vgg16-aug", "onnx"))
    sh(tmp_path, "brainmri", "predict", "--model", onnx, "--out", str(tmp_path / "all.csv"), str(SHARED_DATA), str(tmp_path / "bad"))
    out = pd.read_csv(tmp_path / "all.csv")
    ok = out["error"].isna()
    assert len(out) == 254 and (~ok).sum() == 1 and "zero.jpg" in out.loc[~ok, "path"].item()
    assert out.loc[ok, "probability"].between(0, 1).all() and set(out.loc[ok, "label"]) <= {"yes", "no"}
