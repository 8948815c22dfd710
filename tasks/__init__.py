"""Pipeline stages: one module per DVC stage, pure computation (no orchestration).

`python -m tasks.STAGE [MODEL]` (or `brainmri STAGE [MODEL]`) runs one; dvc.yaml lists, for each stage, exactly the
project files its module imports (tests/test_deps.py keeps that true).
"""
