"""The provider seam: one class per image API, one async method."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from imagebatch.config import ProviderConfig
from imagebatch.models import Prompt

__all__ = ["ImageProvider", "RawImage"]


@dataclass(frozen=True)
class RawImage:
    """Bytes as the provider sent them, before imagebatch checked that they decode."""

    data: bytes
    mime_type: str
    model: str
    #: the shape the adapter asked for (``W:H`` or ``WxH``) when it differs from the prompt's,
    #: e.g. the nearest size an API supports; the image is checked against it
    requested_aspect: str | None = None


class ImageProvider(ABC):
    """An image API behind one narrow method.

    Subclasses set ``kind`` (the config name), make exactly one call per :meth:`generate`, and
    translate their SDK's exceptions into :mod:`imagebatch.errors` in one function.
    """

    kind: ClassVar[str]
    #: honest label shown in records and reports
    offline: ClassVar[bool] = False

    def __init__(self, config: ProviderConfig, env: Mapping[str, str]):
        self.config = config
        self.name = config.name
        self.model = config.model

    @abstractmethod
    async def generate(self, prompt: Prompt) -> RawImage:
        """Make one call for ``prompt``; raise a :class:`~imagebatch.errors.ProviderError`."""

    def price(self, prompt: Prompt) -> float:
        """What one image for ``prompt`` costs on this provider, in USD."""
        return self.config.price_for(prompt.size)

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most providers hold nothing
        """Release clients and connections."""
