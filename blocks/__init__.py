"""Prefect blocks that configure providers and routing from the UI (arrive with the providers)."""
