"""Prefect flows: one per file, orchestration only."""
