"""Scheduled retraining: the pipeline flow as a deployment with a cron or interval schedule."""

from __future__ import annotations

from pathlib import Path

DEPLOYMENT = "scheduled-retraining"  # the default deployment name (`brainmri serve --name`; prefect.yaml's too)


def retraining(params_path: str, cron: str | None, interval: float | None, timezone: str, name: str = DEPLOYMENT):
    """The deployment `brainmri serve` serves: the flow on `params_path`, on a cron or every `interval` seconds."""
    from prefect.schedules import Cron, Interval  # here: `brainmri --help` reads DEPLOYMENT without importing Prefect

    from flows.pipeline import pipeline

    schedule = Interval(interval, timezone=timezone) if interval else Cron(cron, timezone=timezone)
    return pipeline.to_deployment(
        name=name,
        schedule=schedule,
        parameters={"params_path": str(Path(params_path).resolve()), "promote": True},
        concurrency_limit=1,  # overlapping schedules queue instead of fighting over DVC's workspace lock
        description="Brings the DVC pipeline up to date (unchanged inputs run nothing), records the run with dvc exp save, "
        "and serves the retrained model only if it is not worse on validation.",
        tags=["brainmri"],
    )
