"""DVC stage modules: one module per stage of dvc.yaml, pure computation (no orchestration). Not Prefect tasks.

`brainmri STAGE [MODEL|BACKBONE]` (flows/cli.py) runs one, as dvc.yaml's `cmd` does: it calls the function STAGE of
tasks/STAGE.py. dvc.yaml lists, for each stage, exactly the project files its module imports (tests/test_deps.py
keeps that true).
"""
