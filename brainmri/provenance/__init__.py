"""Provenance: lineage from dvc.lock, code deps from the import graph, exact library versions per stage."""
