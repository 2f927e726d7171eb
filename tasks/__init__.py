"""Thin Prefect tasks over the imagebatch core: one side effect each, named verb_noun."""
