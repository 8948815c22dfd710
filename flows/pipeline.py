"""The pipeline flow: ingest -> split -> augment, each stage a Prefect task."""

from __future__ import annotations

from prefect import flow

from brainmri.config import load_params
from tasks.augment import augment_images
from tasks.ingest import ingest_images
from tasks.split import split_dataset


@flow(name="brainmri-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml") -> dict:
    """Run every stage in order on the parameters in `params_path`."""
    p = load_params(params_path)
    ingested = ingest_images(p)
    split = split_dataset(p, wait_for=[ingested])
    augmented = augment_images(p, wait_for=[split])
    return {"ingest": ingested, "split": split, "augment": augmented}
