"""compare-providers: the same prompts through several providers, side by side."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.cache_policies import NO_CACHE

from imagebatch.compare import Outcome, compare_table, contact_sheet
from imagebatch.errors import ConfigError, ImageBatchError
from imagebatch.models import Prompt
from imagebatch.runtime import BatchRuntime
from imagebatch.settings import Settings
from imagebatch.storage import Sink, open_sink
from imagebatch.tasks.generate import generate_image, refusal
from imagebatch.tasks.load import load_config, load_prompts, resolve_provider_blocks


@task(name="publish_contact_sheet", cache_policy=NO_CACHE, persist_result=False)
def publish_contact_sheet(sink: Sink, key: str, png: bytes) -> str:
    """Write the contact sheet; its URI."""
    sink.write(key, png, content_type="image/png", metadata={}, cache_control="no-cache")
    return sink.uri(key)


@flow(name="compare-providers")
async def compare_providers(
    prompts: str = "examples/prompts.jsonl",
    config: str | None = None,
    providers: list[str] | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """Send the same prompts to each provider and compare what comes back.

    Every provider gets every prompt through its own pace, retries and checks, as in a batch.
    The result is a contact sheet (one row per prompt, one column per provider) written under
    ``<output>/compare-<time>/`` and a table artifact (``imagebatch-compare``) of success rate,
    p50/p95 latency, retries and cost per image per provider.

    Args:
        prompts: a prompt file (path or gs://).
        config: the config whose providers to compare (empty: the offline default).
        providers: names of the providers to compare (empty: all in the config).
        output: where to write the contact sheet (empty: the config's output).
    """
    logger = get_run_logger()
    loaded = load_config(config)
    secrets: dict[str, str] = {}
    if any(p.block for p in loaded.providers):
        loaded, secrets = await resolve_provider_blocks(loaded)
    names = providers or [p.name for p in loaded.providers]
    unknown = sorted(set(names) - {p.name for p in loaded.providers})
    if unknown:
        raise ConfigError(
            f"no provider named {unknown[0]!r} in the config", source=config or "<default>"
        )
    batch = load_prompts(prompts).prompts
    settings = Settings()
    sink = open_sink(output or loaded.output, settings=settings)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    generate = generate_image.with_options(
        retries=loaded.retry.max_attempts - 1,
        retry_delay_seconds=loaded.retry.delays(settings.time_scale),
        retry_jitter_factor=loaded.retry.jitter,
    )
    outcomes: list[Outcome] = []

    async def one_provider(name: str) -> None:
        only = loaded.model_copy(
            update={"providers": [p for p in loaded.providers if p.name == name]}
        )
        runtime = BatchRuntime(
            only, sink, f"compare-{stamp}", env={**os.environ, **secrets}, settings=settings
        )
        limit = asyncio.Semaphore(only.prompts_in_flight())

        async def one(prompt: Prompt) -> None:
            async with limit:
                outcome = Outcome(prompt.id, name)
                try:
                    image = await generate(prompt, runtime)
                    refused = await refusal(image)  # a Completed run named "Blocked"
                    if refused is not None:
                        raise refused
                    outcome.image, outcome.cost_usd = image.data, image.cost_usd
                except ImageBatchError as exc:
                    outcome.error = str(exc)
                outcome.attempts = list(runtime.attempts[prompt.id])
                outcomes.append(outcome)

        try:
            await asyncio.gather(*(one(p) for p in batch))
        finally:
            await runtime.aclose()

    await asyncio.gather(*(one_provider(n) for n in names))
    png = await asyncio.to_thread(contact_sheet, [p.id for p in batch], names, outcomes)
    uri = publish_contact_sheet(sink, f"compare-{stamp}/contact-sheet.png", png)
    table = compare_table(names, outcomes)
    await acreate_table_artifact(
        key="imagebatch-compare", table=table, description="The same prompts on each provider"
    )
    link = sink.console_url(f"compare-{stamp}/contact-sheet.png")
    await acreate_markdown_artifact(
        key="imagebatch-compare-sheet",
        markdown=f"# Provider comparison\n\n{len(batch)} prompts x {len(names)} providers: "
        f"[contact sheet]({link})\n",
    )
    logger.info("contact sheet: %s", uri)
    return {"contact_sheet": uri, "table": table}
