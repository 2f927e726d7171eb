"""Prefect blocks that configure providers from the UI (installed as ``imagebatch.blocks``).

Prefect imports this package through the ``prefect.collections`` entry point whenever it looks
a block type up, so the UI and ``prefect block register`` know the provider blocks.
"""

from imagebatch.blocks.providers import (
    BLOCK_TYPES,
    GeminiProviderBlock,
    OpenAIProviderBlock,
    ProviderBlock,
    StabilityProviderBlock,
    VertexEndpointProviderBlock,
    VertexGeminiProviderBlock,
    resolve_provider_blocks,
)

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
