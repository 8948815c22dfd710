"""Pipeline stages: one module per DVC stage; each exposes the stage function and its Prefect task."""

from brainmri.dvcops import StageFailed
from brainmri.errors import BrainMRIError


def retry_on_io_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry crashes and I/O failures, never bad data or params (they fail the same way again)."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.retryable
    except BrainMRIError:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False
