"""Stability AI's stable-image generate endpoints (multipart form in, image bytes out), on httpx."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import httpx

from imagebatch.config import ProviderConfig
from imagebatch.errors import BadImage, ContentRefused
from imagebatch.models import Prompt
from imagebatch.providers._errors import (
    error_for_status,
    parse_retry_after,
    require_key,
    transport_error,
)
from imagebatch.providers.base import ImageProvider, RawImage
from imagebatch.wire import httpx_request_hook

__all__ = ["StabilityProvider"]

DEFAULT_BASE_URL = "https://api.stability.ai"
#: Stability's aspect ratios (9:21 and 21:9 included); others fall back to the nearest listed one
_RATIOS = ("16:9", "1:1", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21")


def _engine(model: str) -> tuple[str, dict[str, str]]:
    """The URL path segment for a model, and extra form fields (SD3 models name themselves)."""
    if model.startswith("sd3"):
        return "sd3", {"model": model}
    return ("ultra" if "ultra" in model else "core"), {}


def _nearest_ratio(aspect: str) -> str:
    if aspect in _RATIOS:
        return aspect
    w, h = (int(x) for x in aspect.split(":"))
    return min(_RATIOS, key=lambda r: abs(int(r.split(":")[0]) / int(r.split(":")[1]) - w / h))


class StabilityProvider(ImageProvider):
    """Options: ``output_format`` (png, jpeg, webp)."""

    kind: ClassVar[str] = "stability"

    def __init__(self, config: ProviderConfig, env: Mapping[str, str]):
        super().__init__(config, env)
        self._env = env
        self._client: httpx.AsyncClient | None = None

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            key = require_key(
                self._env, self.config.api_key_env, provider=self.name, model=self.model
            )
            timeout = self.config.timeout_s
            self._client = httpx.AsyncClient(
                base_url=self.config.base_url or DEFAULT_BASE_URL,
                headers={"authorization": f"Bearer {key}", "accept": "image/*"},
                timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                event_hooks={"request": [httpx_request_hook]},  # when it really leaves
            )
        return self._client

    async def generate(self, prompt: Prompt) -> RawImage:
        client = self._get_client()
        engine, extra = _engine(self.model)
        fmt = self.config.options.get("output_format", "png")
        form: dict[str, Any] = {
            "prompt": prompt.prompt,
            "aspect_ratio": _nearest_ratio(prompt.aspect_ratio),
            "output_format": fmt,
            **extra,
        }
        if prompt.negative_prompt:
            form["negative_prompt"] = prompt.negative_prompt
        if prompt.seed is not None:
            form["seed"] = str(prompt.seed)
        who = {"provider": self.name, "model": self.model}
        try:
            # files= makes httpx send multipart/form-data, which the API requires
            response = await client.post(
                f"/v2beta/stable-image/generate/{engine}", data=form, files={"none": ""}
            )
        except Exception as exc:
            translated = transport_error(exc, timeout_s=self.config.timeout_s, **who)
            raise (translated if translated is not None else exc) from None
        if response.status_code != 200:
            raise self._translate(response)
        finish = response.headers.get("finish-reason", "SUCCESS").upper()
        if finish == "CONTENT_FILTERED":
            raise ContentRefused("finish-reason CONTENT_FILTERED", http_status=200, **who)
        if finish != "SUCCESS":
            raise BadImage(f"finish-reason {finish}", http_status=200, **who)
        if not response.content:
            raise BadImage("the response has no image bytes", http_status=200, **who)
        mime = response.headers.get("content-type", f"image/{fmt}").split(";")[0]
        return RawImage(
            data=response.content,
            mime_type=mime,
            model=self.model,
            requested_aspect=form["aspect_ratio"],
        )

    def _translate(self, response: httpx.Response) -> Exception:
        """The one place where Stability's error answers become imagebatch errors."""
        who = {"provider": self.name, "model": self.model}
        try:
            body = response.json()
        except ValueError:
            body = {}
        name = str(body.get("name", "")) if isinstance(body, dict) else ""
        errors = body.get("errors") if isinstance(body, dict) else None
        message = (
            "; ".join(map(str, errors))
            if errors
            else (response.text[:300] or f"HTTP {response.status_code}")
        )
        if name in ("content_moderation", "content_filtered"):
            return ContentRefused(message, http_status=response.status_code, **who)
        hint = parse_retry_after(response.headers)
        return error_for_status(response.status_code, message, retry_after=hint, **who)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
