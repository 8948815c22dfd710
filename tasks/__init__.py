"""Pipeline stages: one module per DVC stage, each exposing its Prefect task."""
