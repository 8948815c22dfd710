"""Prefect's side of a run: the task runner params ask for, and Prefect's temporary server started early."""

from __future__ import annotations

from prefect.task_runners import ThreadPoolTaskRunner

from brainmri.config import Orchestration
from brainmri.core.errors import BrainMRIError


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


def start_server_beside():
    """Prefect's temporary server, started in a thread exactly as Prefect's client would start it on first use (the
    same singleton, so the flow finds it running); None when a server is configured (PREFECT_API_URL) or the
    temporary one is off. Its process starts on another core while this one reads DVC's workspace."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    def start() -> str:
        server = SubprocessASGIServer()
        server.start()  # its start-up error, if any, is Prefect's own message
        return server.api_url

    pool = ThreadPoolExecutor(1, thread_name_prefix="prefect-server")
    future = pool.submit(contextvars.copy_context().run, start)  # the caller's Prefect settings (temporary_settings) too
    pool.shutdown(wait=False)
    return future
