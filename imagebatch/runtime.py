"""The per-run state that every prompt's work shares: providers, attempts, records.

One :class:`BatchRuntime` lives for one flow run, on the flow's event loop. Prefect tasks are
thin wrappers around its methods.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime

from imagebatch.config import BatchConfig
from imagebatch.errors import GiveUpError, ProviderError, RetryableError, error_kind
from imagebatch.imaging import (
    ALGORITHMIC_SOURCE_TYPE,
    DIGITAL_SOURCE_TYPE,
    Rendition,
    inspect_image,
    render_renditions,
)
from imagebatch.models import Attempt, GeneratedImage, Prompt, PromptRecord, StoredObject
from imagebatch.providers import ImageProvider, build_provider
from imagebatch.records import RecordStore, reuse_key
from imagebatch.resilience import (
    AttemptInfo,
    FileHealthStore,
    FileUsageStore,
    HealthStore,
    SharedLimits,
    UsageStore,
    build_router,
)
from imagebatch.resilience.router import Emit
from imagebatch.settings import Settings
from imagebatch.storage import Sink

__all__ = ["BatchRuntime", "is_retryable"]


class BatchRuntime:
    """Providers, router, records and attempt history for one batch run."""

    def __init__(
        self,
        config: BatchConfig,
        sink: Sink,
        batch_id: str,
        *,
        env: Mapping[str, str],
        settings: Settings | None = None,
        store: UsageStore | None = None,
        shared: SharedLimits | None = None,
        health: HealthStore | None = None,
        emit: Emit = lambda event, provider, payload: None,
    ):
        self.config = config
        self.sink = sink
        self.batch_id = batch_id
        self.settings = settings or Settings()
        self.records = RecordStore(sink, batch_id)
        self.providers: list[ImageProvider] = [
            build_provider(p, env, index=i, time_scale=self.settings.time_scale)
            for i, p in enumerate(config.providers)
        ]
        self._by_name = {p.name: p for p in self.providers}
        self.attempts: dict[str, list[Attempt]] = defaultdict(list)
        self._store = store or FileUsageStore(self.settings.state_dir)
        self.router = build_router(
            config,
            {p.name: p.price for p in self.providers},
            store=self._store,
            time_scale=self.settings.time_scale,
            emit=emit,
            on_attempt=self._on_attempt,
            shared=shared,
        )
        # start from what the last run learned about each provider
        self._health = health or FileHealthStore(self.settings.state_dir)
        recorded = {}
        for lane in self.router.lanes:
            saved = self._health.read(lane.key)
            if saved is not None:
                recorded[lane.name] = saved
        self.health_notes = self.router.start_from(recorded, datetime.now(UTC))

    async def generate(self, prompt: Prompt) -> GeneratedImage:
        """One attempt: the router's best provider now, its gate, one call, a decodable image.

        A retryable error is raised for a later retry; a move-on error sends the same attempt to
        the next provider; a give-up error ends the prompt (``final_status`` says how).
        """
        return await self.router.attempt(prompt, lambda name: self._call(prompt, name))

    async def _call(self, prompt: Prompt, name: str) -> GeneratedImage:
        provider = self._by_name[name]
        try:
            raw = await provider.generate(prompt)
            # inside the attempt, so a bad image counts against this provider and can fail over
            info = await asyncio.to_thread(
                inspect_image, raw.data, raw.requested_aspect or prompt.aspect_ratio
            )
        except ProviderError as exc:
            exc.provider = exc.provider or provider.name
            exc.model = exc.model or provider.model
            raise
        except Exception as exc:  # an adapter bug must not look like a provider outage
            raise GiveUpError(
                f"unexpected {type(exc).__name__}: {exc}",
                provider=provider.name,
                model=provider.model,
            ) from exc
        return GeneratedImage(
            data=raw.data,
            mime_type=raw.mime_type,
            width=info.width,
            height=info.height,
            provider=provider.name,
            model=raw.model,
            cost_usd=provider.price(prompt),
        )

    def _on_attempt(self, prompt: Prompt, info: AttemptInfo) -> None:
        self.attempts[prompt.id].append(
            Attempt(
                provider=info.provider,
                outcome=info.outcome,
                http_status=info.http_status,
                latency_s=info.latency_s,
                waited_s=info.waited_s,
                error=info.error,
            )
        )

    async def render(self, prompt: Prompt, image: GeneratedImage) -> list[Rendition]:
        """The configured renditions of ``image``, with provenance metadata embedded."""
        metadata = {"prompt_id": prompt.id, "provider": image.provider, "model": image.model}
        offline = any(p.offline for p in self.providers if p.name == image.provider)
        return await asyncio.to_thread(
            render_renditions,
            image.data,
            self.config.renditions,
            metadata,
            source_type=ALGORITHMIC_SOURCE_TYPE if offline else DIGITAL_SOURCE_TYPE,
            aspect_ratio=prompt.aspect_ratio,
        )

    async def publish(
        self, prompt: Prompt, image: GeneratedImage, renditions: list[Rendition]
    ) -> PromptRecord:
        """Write the renditions, then the success record (create-only)."""
        meta = {"prompt_id": prompt.id, "provider": image.provider, "model": image.model}
        objects: list[StoredObject] = []
        for r in renditions:
            key = self.records.object_key(prompt.id, f"{r.name}.{r.extension}")
            await asyncio.to_thread(
                self.sink.write,
                key,
                r.data,
                content_type=r.content_type,
                metadata={**meta, "sha256": r.sha256},
                cache_control=self.config.publish.cache_control,
            )
            objects.append(
                StoredObject(
                    rendition=r.name,
                    uri=self.sink.uri(key),
                    sha256=r.sha256,
                    width=r.width,
                    height=r.height,
                    bytes=len(r.data),
                    content_type=r.content_type,
                )
            )
        record = PromptRecord(
            id=prompt.id,
            status="succeeded",
            provider=image.provider,
            model=image.model,
            attempts=list(self.attempts[prompt.id]),
            cost_usd=image.cost_usd,
            objects=objects,
            batch_id=self.batch_id,
            finished_at=datetime.now(UTC),
        )
        kept = await asyncio.to_thread(self.records.write_success, record)
        await asyncio.to_thread(self._remember, prompt, kept)
        return kept

    def reusable(self, prompt: Prompt) -> bool:
        """Whether the config lets ``prompt`` reuse an image an earlier batch published."""
        mode = self.config.publish.reuse
        return mode == "always" or (mode == "seeded" and prompt.seed is not None)

    def _reuse_keys(self, prompt: Prompt) -> list[str]:
        # the prompt's preferred provider's model first, then the chain's, each once
        names = [prompt.provider] if prompt.provider in self._by_name else []
        names += [p.name for p in self.providers]
        models = dict.fromkeys(self._by_name[n].model for n in names)
        return [reuse_key(prompt, model, self.config.renditions) for model in models]

    async def reuse(self, prompt: Prompt) -> PromptRecord | None:
        """Publish an earlier batch's images for ``prompt`` if it made the very same ones."""
        if not self.reusable(prompt):
            return None
        source = await asyncio.to_thread(self.records.find_reusable, self._reuse_keys(prompt))
        if source is None:
            return None
        record = await asyncio.to_thread(self.records.reuse, prompt.id, source)
        await asyncio.to_thread(self._remember, prompt, record)
        self.router.settled(prompt.id)
        return record

    def _remember(self, prompt: Prompt, record: PromptRecord) -> None:
        if self.reusable(prompt) and record.model and record.batch_id == self.batch_id:
            self.records.remember(reuse_key(prompt, record.model, self.config.renditions), record)

    async def record_failure(self, prompt: Prompt, error: BaseException) -> PromptRecord:
        """Write (or replace) the failure record of a prompt that ended without images."""
        status = getattr(error, "final_status", "failed")
        last_provider = self.attempts[prompt.id][-1] if self.attempts[prompt.id] else None
        record = PromptRecord(
            id=prompt.id,
            status=status,
            provider=last_provider.provider if last_provider else None,
            attempts=list(self.attempts[prompt.id]),
            error=str(error),
            error_kind=error_kind(error),
            batch_id=self.batch_id,
            finished_at=datetime.now(UTC),
        )
        await asyncio.to_thread(self.records.write_failure, record)
        self.router.settled(prompt.id)
        return record

    async def aclose(self) -> None:
        for provider in self.providers:
            await provider.aclose()
        await self.router.shared.aclose()
        keys = {lane.name: lane.key for lane in self.router.lanes}
        for name, health in self.router.health(datetime.now(UTC)).items():
            await asyncio.to_thread(self._health.write, keys[name], health)
        close = getattr(self._store, "close", None)
        if close is not None:
            await asyncio.to_thread(close)


def is_retryable(error: BaseException) -> bool:
    """Whether the error hierarchy calls ``error`` worth another try on the same provider."""
    return isinstance(error, RetryableError)
