"""Provider adapters and the registry that maps config kinds to them."""

from __future__ import annotations

from collections.abc import Mapping

from imagebatch.config import ProviderConfig
from imagebatch.errors import ConfigError
from imagebatch.providers.base import ImageProvider, RawImage
from imagebatch.providers.local import LocalProvider

__all__ = ["REGISTRY", "ImageProvider", "LocalProvider", "RawImage", "build_provider"]

#: config ``kind`` -> adapter class; the first registered name for a kind wins
REGISTRY: dict[str, type[ImageProvider]] = {LocalProvider.kind: LocalProvider}


def build_provider(
    config: ProviderConfig, env: Mapping[str, str], *, index: int = 0
) -> ImageProvider:
    """Instantiate the adapter for one chain entry."""
    cls = REGISTRY.get(config.kind)
    if cls is None:
        raise ConfigError(
            f"provider kind '{config.kind}' has no adapter in this version of imagebatch; "
            f"available: {', '.join(sorted(REGISTRY))}",
            source="config",
            key=f"providers[{index}].kind",
        )
    return cls(config, env)
