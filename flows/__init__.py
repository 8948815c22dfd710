"""Prefect flows that wire the stage tasks together."""
