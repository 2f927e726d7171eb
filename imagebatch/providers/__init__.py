"""Provider adapters and the registry that maps config kinds to them."""

from __future__ import annotations

from collections.abc import Mapping

from imagebatch.config import ProviderConfig
from imagebatch.errors import ConfigError
from imagebatch.providers.base import ImageProvider, RawImage
from imagebatch.providers.gemini import GeminiProvider, VertexGeminiProvider
from imagebatch.providers.local import LocalProvider
from imagebatch.providers.openai_images import OpenAIImagesProvider
from imagebatch.providers.stability import StabilityProvider
from imagebatch.providers.vertex_endpoint import VertexEndpointProvider

__all__ = [
    "REGISTRY",
    "GeminiProvider",
    "ImageProvider",
    "LocalProvider",
    "OpenAIImagesProvider",
    "RawImage",
    "StabilityProvider",
    "VertexEndpointProvider",
    "VertexGeminiProvider",
    "build_provider",
]

#: config ``kind`` -> adapter class
REGISTRY: dict[str, type[ImageProvider]] = {
    cls.kind: cls
    for cls in (
        GeminiProvider,
        VertexGeminiProvider,
        OpenAIImagesProvider,
        StabilityProvider,
        VertexEndpointProvider,
        LocalProvider,
    )
}


def build_provider(
    config: ProviderConfig, env: Mapping[str, str], *, index: int = 0, time_scale: float = 1.0
) -> ImageProvider:
    """Instantiate the adapter for one chain entry; its timeout in this clock's seconds (the
    emulator's ``time_scale`` divides every provider-time setting, as it divides latencies)."""
    cls = REGISTRY.get(config.kind)
    if cls is None:
        raise ConfigError(
            f"provider kind '{config.kind}' has no adapter; known: {', '.join(sorted(REGISTRY))}",
            source="config",
            key=f"providers[{index}].kind",
        )
    if time_scale != 1.0:
        config = config.model_copy(update={"timeout_s": config.timeout_s / time_scale})
    return cls(config, env)
