"""Pipeline stages: one module per DVC stage, each exposing its Prefect task."""

from brainmri.errors import BrainMRIError


def retry_on_io_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry I/O failures, never bad data or configuration (they fail the same way again)."""
    try:
        state.result()
    except BrainMRIError:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False
