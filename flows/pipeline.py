"""The pipeline flow: ingest -> split -> augment -> (train -> evaluate, export -> benchmark) per model -> report."""

from __future__ import annotations

from prefect import flow

from brainmri.config import load_params
from tasks.augment import augment_images
from tasks.benchmark import benchmark_model
from tasks.evaluate import evaluate_model
from tasks.export import export_model
from tasks.ingest import ingest_images
from tasks.report import write_report
from tasks.split import split_dataset
from tasks.train import train_model


@flow(name="brainmri-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml") -> dict:
    """Run every stage on the parameters in `params_path`; models run one after another (one DVC workspace)."""
    p = load_params(params_path)
    ingested = ingest_images(p)
    split = split_dataset(p, wait_for=[ingested])
    augmented = augment_images(p, wait_for=[split])
    evaluated, benchmarked = {}, {}
    for name in p.models:
        trained = train_model(p, name, wait_for=[augmented])
        evaluated[name] = evaluate_model(p, name, wait_for=[trained])
        exported = export_model(p, name, wait_for=[trained])
        benchmarked[name] = benchmark_model(p, name, wait_for=[exported])
    report = write_report(p, wait_for=[*evaluated.values(), *benchmarked.values()])
    return {"ingest": ingested, "split": split, "augment": augmented, "evaluate": evaluated, "benchmark": benchmarked, "report": report}
