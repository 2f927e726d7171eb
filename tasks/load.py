"""Tasks that read a batch's inputs."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from imagebatch.blocks.providers import resolve_provider_blocks as _resolve_provider_blocks
from imagebatch.config import BatchConfig
from imagebatch.config import load_config as _load_config
from imagebatch.prompts import PromptLoad
from imagebatch.prompts import load_prompts as _load_prompts


@task(name="load_config", cache_policy=NO_CACHE)
def load_config(path: str | None) -> BatchConfig:
    """Read and validate the batch config (the embedded default when ``path`` is empty).

    Args:
        path: a YAML file, or None for the offline default.
    Returns:
        The validated config. A bad file fails this task with the file, line and key.
    """
    return _load_config(path)


@task(name="resolve_provider_blocks", cache_policy=NO_CACHE, persist_result=False)
async def resolve_provider_blocks(config: BatchConfig) -> tuple[BatchConfig, dict[str, str]]:
    """Fill the chain entries that name a saved provider block (keys stay out of the config).

    Returns:
        The filled config, and the keys under the variable names the entries now point to.
        Nothing of the keys is logged or persisted.
    """
    return await _resolve_provider_blocks(config)


@task(name="load_prompts", cache_policy=NO_CACHE)
def load_prompts(source: str, skip_bad_rows: bool = False) -> PromptLoad:
    """Read and validate a prompt file before any image is generated.

    Args:
        source: a JSONL, CSV or YAML file.
        skip_bad_rows: leave bad rows out (they are logged and counted) instead of failing.
    Returns:
        The prompts, and the rows that were skipped.
    """
    return _load_prompts(source, skip_bad_rows=skip_bad_rows)
