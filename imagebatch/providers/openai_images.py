"""OpenAI images (``images.generate``) and OpenAI-compatible gateways, through the openai SDK.

``base_url`` is the server root (``https://api.openai.com``, a gateway, the emulator); ``/v1`` is
added unless it is already there. The SDK's own retries are off (its default is 2).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, ClassVar

import openai

from imagebatch.config import ProviderConfig
from imagebatch.errors import BadImage, ContentRefused, DailyQuotaExhausted
from imagebatch.models import Prompt
from imagebatch.providers._errors import (
    error_for_status,
    parse_retry_after,
    require_key,
    transport_error,
)
from imagebatch.providers.base import ImageProvider, RawImage
from imagebatch.wire import httpx_request_hook

__all__ = ["OpenAIImagesProvider"]

#: error codes that mean the content was refused
REFUSED_CODES = frozenset({"moderation_blocked", "content_policy_violation", "safety_violation"})
_SIZES = {"square": "1024x1024", "landscape": "1536x1024", "portrait": "1024x1536"}
_DALLE_SIZES = {"square": "1024x1024", "landscape": "1792x1024", "portrait": "1024x1792"}


def _shape(aspect_ratio: str) -> str:
    w, h = (int(x) for x in aspect_ratio.split(":"))
    return "square" if w == h else ("landscape" if w > h else "portrait")


class OpenAIImagesProvider(ImageProvider):
    """Options: ``quality``, ``output_format`` (png, jpeg, webp), ``sizes`` (shape -> WxH)."""

    kind: ClassVar[str] = "openai"

    def __init__(self, config: ProviderConfig, env: Mapping[str, str]):
        super().__init__(config, env)
        self._env = env
        self._client: openai.AsyncOpenAI | None = None

    def _get_client(self) -> openai.AsyncOpenAI:
        if self._client is None:
            key = require_key(
                self._env, self.config.api_key_env, provider=self.name, model=self.model
            )
            base_url = self.config.base_url
            if base_url and not base_url.rstrip("/").endswith("/v1"):
                base_url = base_url.rstrip("/") + "/v1"
            self._client = openai.AsyncOpenAI(
                api_key=key,
                base_url=base_url,
                max_retries=0,
                timeout=self.config.timeout_s,
                # the SDK's own client settings, plus a hook for when a request really leaves
                http_client=openai.DefaultAsyncHttpxClient(
                    event_hooks={"request": [httpx_request_hook]}
                ),
            )
        return self._client

    def _params(self, prompt: Prompt) -> dict[str, Any]:
        options = self.config.options
        dalle = self.model.startswith("dall-e")
        sizes = {**(_DALLE_SIZES if dalle else _SIZES), **options.get("sizes", {})}
        text = prompt.prompt
        if prompt.negative_prompt:
            text += f"\n\nAvoid: {prompt.negative_prompt}"
        params: dict[str, Any] = {
            "model": self.model,
            "prompt": text,
            "n": 1,
            "size": sizes[_shape(prompt.aspect_ratio)],
        }
        if dalle:
            params["response_format"] = "b64_json"
        elif options.get("output_format"):
            params["output_format"] = options["output_format"]
        if options.get("quality"):
            params["quality"] = options["quality"]
        return params

    async def generate(self, prompt: Prompt) -> RawImage:
        client = self._get_client()
        params = self._params(prompt)
        try:
            response = await client.images.generate(**params)
        except Exception as exc:
            raise self._translate(exc) from None
        who = {"provider": self.name, "model": self.model}
        if not response.data or not response.data[0].b64_json:
            raise BadImage("the response has no image data", **who)
        try:
            data = base64.b64decode(response.data[0].b64_json, validate=True)
        except (binascii.Error, ValueError):
            raise BadImage("the image data is not valid base64", **who) from None
        fmt = (
            getattr(response, "output_format", None)
            or self.config.options.get("output_format")
            or "png"
        )
        size = params.get("size")
        return RawImage(
            data=data,
            mime_type=f"image/{fmt}",
            model=self.model,
            requested_aspect=size if size and "x" in size else None,
        )

    def _translate(self, exc: Exception) -> Exception:
        """The one place where the openai SDK's exceptions become imagebatch errors."""
        who = {"provider": self.name, "model": self.model}
        if isinstance(exc, openai.APITimeoutError):
            return transport_error(TimeoutError(), timeout_s=self.config.timeout_s, **who) or exc
        if isinstance(exc, openai.APIConnectionError):
            return transport_error(ConnectionError(), timeout_s=self.config.timeout_s, **who) or exc
        if isinstance(exc, openai.APIStatusError):
            body = exc.body if isinstance(exc.body, dict) else {}
            error = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
            code = str(error.get("code") or "")
            message = str(error.get("message") or exc.message)
            status = exc.status_code
            if code in REFUSED_CODES:
                return ContentRefused(message, http_status=status, **who)
            if code == "insufficient_quota":
                return DailyQuotaExhausted(message, http_status=status, **who)
            hint = parse_retry_after(exc.response.headers)
            return error_for_status(status, message, retry_after=hint, **who)
        translated = transport_error(exc, timeout_s=self.config.timeout_s, **who)
        return translated if translated is not None else exc

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
