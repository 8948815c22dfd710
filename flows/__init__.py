"""The orchestration layer: the `brainmri` command (cli.py), the Prefect flow over DVC's stage graph (pipeline.py,
with workspace.py, scheduler.py, stage_process.py, prefect_setup.py), the promotion step (promote.py), the scheduled
deployment (serve.py) and the offline demo workspace (demo.py)."""
