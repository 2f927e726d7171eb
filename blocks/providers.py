"""Prefect blocks for image providers: change a key, a model or a quota in the UI, not in code.

Register them once per Prefect server::

    prefect block register -m imagebatch.blocks.providers

then create one in the UI (Blocks, +) and name it in the config: ``block: imagebatch-gemini/NAME``.
The block's fields fill the provider entry; keys stay in the block as secrets.
"""

from __future__ import annotations

from abc import ABC
from typing import Any, ClassVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from imagebatch.config import BatchConfig, Limits, ProviderConfig
from imagebatch.errors import ConfigError

__all__ = [
    "BLOCK_TYPES",
    "GeminiProviderBlock",
    "OpenAIProviderBlock",
    "ProviderBlock",
    "StabilityProviderBlock",
    "VertexEndpointProviderBlock",
    "VertexGeminiProviderBlock",
    "resolve_provider_blocks",
]

_DOCS = "https://github.com/imagebatch/imagebatch#providers"


class ProviderBlock(Block, ABC):
    """Settings shared by every provider block."""

    _documentation_url = _DOCS
    kind: ClassVar[str]

    model: str = Field(description="The model to call, for example gemini-3-pro-image-preview.")
    base_url: str | None = Field(
        default=None,
        description="Server root for gateways and the emulator; empty for the default.",
    )
    rpm: float | None = Field(default=None, gt=0, description="Requests per minute allowed.")
    rpd: int | None = Field(default=None, ge=0, description="Requests per day allowed.")
    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Calls at once at most; empty: twice the rate x latency (at least 4).",
    )
    price_usd_1k: float | None = Field(
        default=None, ge=0, description="Price of one 1K image in USD."
    )
    price_usd_2k: float | None = Field(
        default=None, ge=0, description="Price of one 2K image in USD."
    )
    price_usd_4k: float | None = Field(
        default=None, ge=0, description="Price of one 4K image in USD."
    )
    timeout_s: float = Field(
        default=120.0, gt=0, le=3600, description="Seconds before a call is abandoned."
    )

    def secret(self) -> str | None:
        """The API key, if this kind uses one."""
        return None

    def options(self) -> dict[str, Any]:
        """Adapter options this block sets."""
        return {}

    def to_provider_config(self, name: str, *, api_key_env: str | None) -> ProviderConfig:
        """The chain entry this block describes, its key named by ``api_key_env``."""
        prices = {
            size: value
            for size, value in (
                ("1K", self.price_usd_1k),
                ("2K", self.price_usd_2k),
                ("4K", self.price_usd_4k),
            )
            if value is not None
        }
        return ProviderConfig(
            name=name,
            kind=self.kind,
            model=self.model,
            base_url=self.base_url,
            api_key_env=api_key_env,
            limits=Limits(rpm=self.rpm, rpd=self.rpd, max_in_flight=self.max_in_flight),
            price_usd=prices,
            timeout_s=self.timeout_s,
            options=self.options(),
        )


class _KeyedProviderBlock(ProviderBlock, ABC):
    api_key: SecretStr = Field(description="The provider's API key, stored encrypted.")

    def secret(self) -> str | None:
        return self.api_key.get_secret_value()


class GeminiProviderBlock(_KeyedProviderBlock):
    """Gemini image models through the Gemini Developer API (Google AI Studio), with an API key."""

    _block_type_name = "imagebatch Gemini"
    _block_type_slug = "imagebatch-gemini"
    kind: ClassVar[str] = "gemini"


class VertexGeminiProviderBlock(ProviderBlock):
    """Gemini image models on Vertex AI, with Application Default Credentials."""

    _block_type_name = "imagebatch Vertex Gemini"
    _block_type_slug = "imagebatch-vertex-gemini"
    kind: ClassVar[str] = "vertex-gemini"

    project: str = Field(description="The Google Cloud project that is billed.")
    location: str = Field(
        default="global", description="The Vertex AI location, for example global."
    )

    def options(self) -> dict[str, Any]:
        return {"project": self.project, "location": self.location}


class OpenAIProviderBlock(_KeyedProviderBlock):
    """OpenAI images, or any OpenAI-compatible gateway through base_url."""

    _block_type_name = "imagebatch OpenAI"
    _block_type_slug = "imagebatch-openai"
    kind: ClassVar[str] = "openai"

    quality: str | None = Field(default=None, description="Image quality, for example high.")

    def options(self) -> dict[str, Any]:
        return {"quality": self.quality} if self.quality else {}


class StabilityProviderBlock(_KeyedProviderBlock):
    """Stability AI stable-image generate (core, ultra, sd3)."""

    _block_type_name = "imagebatch Stability"
    _block_type_slug = "imagebatch-stability"
    kind: ClassVar[str] = "stability"


class VertexEndpointProviderBlock(ProviderBlock):
    """A self-deployed image model on a Vertex AI endpoint."""

    _block_type_name = "imagebatch Vertex Endpoint"
    _block_type_slug = "imagebatch-vertex-endpoint"
    kind: ClassVar[str] = "vertex-endpoint"

    project: str = Field(description="The Google Cloud project of the endpoint.")
    location: str = Field(default="us-central1", description="The endpoint's region.")
    endpoint: str = Field(description="The endpoint id or full resource name.")

    def options(self) -> dict[str, Any]:
        return {"project": self.project, "location": self.location, "endpoint": self.endpoint}


#: block type slug -> class, for ``block: <slug>/<name>`` in a config file
BLOCK_TYPES: dict[str, type[ProviderBlock]] = {
    cls._block_type_slug: cls
    for cls in (
        GeminiProviderBlock,
        VertexGeminiProviderBlock,
        OpenAIProviderBlock,
        StabilityProviderBlock,
        VertexEndpointProviderBlock,
    )
}


async def resolve_provider_blocks(config: BatchConfig) -> tuple[BatchConfig, dict[str, str]]:
    """Fill every chain entry that names a block from the saved block.

    Fields written next to ``block`` in the config override the block's. Keys are returned
    separately, under generated variable names the entries point to, and never enter the config.
    """
    providers: list[ProviderConfig] = []
    secrets: dict[str, str] = {}
    for index, entry in enumerate(config.providers):
        if entry.block is None:
            providers.append(entry)
            continue
        key = f"providers[{index}].block"
        slug, _, name = entry.block.partition("/")
        cls = BLOCK_TYPES.get(slug)
        if cls is None:
            raise ConfigError(
                f"unknown block type '{slug}'; imagebatch's are: {', '.join(sorted(BLOCK_TYPES))}",
                source="config",
                key=key,
            )
        try:
            block = await cls.aload(name)
        except ValueError:
            raise ConfigError(
                f"no saved block '{entry.block}' on this Prefect server; create it in the UI "
                "(Blocks) after 'prefect block register -m imagebatch.blocks.providers'",
                source="config",
                key=key,
            ) from None
        env_name = None
        if block.secret():
            env_name = f"IMAGEBATCH_BLOCK_SECRET_{index}"
            secrets[env_name] = block.secret() or ""
        filled = block.to_provider_config(entry.name, api_key_env=env_name).model_dump()
        overrides = entry.model_dump(include=entry.model_fields_set - {"name", "block"})
        providers.append(
            ProviderConfig.model_validate({**filled, **overrides, "block": entry.block})
        )
    return config.model_copy(update={"providers": providers}), secrets
