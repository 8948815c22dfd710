"""The pipeline flow: every DVC stage brought up to date, model branches fanned out; DVC decides what is stale.

ingest -> split -> augment -> per model: train -> evaluate -> export -> benchmark -> report
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from brainmri.config import Orchestration, load_params
from brainmri.dvcops import pipeline_stages
from brainmri.errors import BrainMRIError
from tasks.augment import augment_images
from tasks.benchmark import benchmark_model
from tasks.evaluate import evaluate_model
from tasks.export import export_model
from tasks.ingest import ingest_images
from tasks.report import publish_report, write_report
from tasks.split import split_dataset
from tasks.train import train_model

MODEL_TASKS = {"train": train_model, "evaluate": evaluate_model, "export": export_model, "benchmark": benchmark_model}


class PipelineFailed(BrainMRIError):
    """One or more stages failed; the message names them and what did not run because of them."""


def task_runner(o: Orchestration):
    """The task runner params ask for: threads of this process, or a Dask cluster (prefect-dask)."""
    if o.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=o.max_workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise BrainMRIError("orchestration.task_runner is 'dask' but prefect-dask is not installed: pip install prefect-dask") from None
    if o.dask_address:
        return DaskTaskRunner(address=o.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": o.max_workers, "threads_per_worker": 1, "processes": True})


def outcome(futures: dict) -> dict:
    """Wait for every stage; return what ran and why, or raise naming the failed stages and what they held back."""
    results, failed, held = {}, {}, []
    for stage, future in futures.items():
        future.wait()
        state = future.state
        if state.is_completed():
            results[stage] = future.result()
        elif state.is_failed() or state.is_crashed():
            failed[stage] = state.message or state.name
        else:
            held.append(stage)
    if failed:
        lines = [f"{stage}: {msg}" for stage, msg in failed.items()]
        note = f"; not run because of it: {', '.join(held)}" if held else ""
        raise PipelineFailed(f"{len(failed)} stage(s) failed: {' | '.join(lines)}{note}; other branches finished and are recorded")
    return results


@flow(name="brainmri-stages")
def run_stages(root: str, models: list[str], retries: int, retry_delay: int) -> dict:
    """Bring every stage up to date in DAG order; each model's chain is a branch of its own."""
    opts = {"retries": retries, "retry_delay_seconds": retry_delay}
    futures = {"ingest": ingest_images.with_options(**opts).submit(root)}
    futures["split"] = split_dataset.with_options(**opts).submit(root, wait_for=[futures["ingest"]])
    futures["augment"] = augment_images.with_options(**opts).submit(root, wait_for=[futures["split"]])
    for name in models:
        upstream = futures["augment"]
        for stage, t in MODEL_TASKS.items():
            upstream = futures[f"{stage}@{name}"] = t.with_options(**opts).submit(root, name, wait_for=[upstream])
    futures["report"] = write_report.with_options(**opts).submit(root, wait_for=list(futures.values()))
    return outcome(futures)


@flow(name="brainmri-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml") -> dict:
    """Run the pipeline on `params_path`: the stages `dvc repro` would run, then the report's tables as artifacts."""
    p = load_params(params_path)
    root = str(Path(p.root).resolve())
    wired = {"ingest", "split", "augment", "report", *(f"{s}@{m}" for s in MODEL_TASKS for m in p.models)}
    if differ := set(pipeline_stages(p.root)) ^ wired:
        raise BrainMRIError(f"dvc.yaml and the flow disagree on these stages: {', '.join(sorted(differ))}")
    o = p.orchestration
    runs = run_stages.with_options(task_runner=task_runner(o))(root, list(p.models), o.retries, o.retry_delay)
    publish_report(str(Path(params_path).resolve()))
    return runs
