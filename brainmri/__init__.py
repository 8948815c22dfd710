"""Brain MRI tumour classification: a DVC + Prefect transfer-learning pipeline."""

__version__ = "0.1.0"
