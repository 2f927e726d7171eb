"""Gemini image models ("Nano Banana") through google-genai: the Developer API and Vertex AI.

``gemini`` uses an API key (AI Studio); ``vertex-gemini`` uses a Google Cloud project, location
and credentials (Application Default Credentials unless given). google-genai gets an explicit
httpx client, so its behaviour does not change when aiohttp happens to be installed, and its own
retries stay off: retrying is the pipeline's job.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, ClassVar

import httpx
import pydantic
from google.auth import exceptions as google_auth_errors
from google.genai import Client, types
from google.genai import errors as genai_errors

from imagebatch.config import ProviderConfig
from imagebatch.errors import (
    AuthenticationFailed,
    BadImage,
    ContentRefused,
    ProviderError,
    ProviderNotConfigured,
)
from imagebatch.models import Prompt
from imagebatch.providers._errors import google_error, require_key, transport_error
from imagebatch.providers.base import ImageProvider, RawImage
from imagebatch.wire import httpx_request_hook

__all__ = ["GeminiProvider", "VertexGeminiProvider"]

#: finish reasons that mean the content was refused, not that something broke
REFUSED_FINISH_REASONS = frozenset(
    {
        "SAFETY",
        "IMAGE_SAFETY",
        "PROHIBITED_CONTENT",
        "IMAGE_PROHIBITED_CONTENT",
        "BLOCKLIST",
        "SPII",
        "RECITATION",
        "IMAGE_RECITATION",
        "NO_IMAGE",
        "IMAGE_OTHER",
    }
)


def _name(value: Any) -> str:
    return str(getattr(value, "value", value) or "")


class GeminiProvider(ImageProvider):
    """Gemini Developer API. Options: ``image_size`` (send 1K/2K/4K; default true)."""

    kind: ClassVar[str] = "gemini"

    def __init__(self, config: ProviderConfig, env: Mapping[str, str], *, credentials: Any = None):
        super().__init__(config, env)
        self._env = env
        self._credentials = credentials
        self._client: Client | None = None
        self._http: httpx.AsyncClient | None = None

    def _client_kwargs(self) -> dict[str, Any]:
        key = require_key(self._env, self.config.api_key_env, provider=self.name, model=self.model)
        return {"api_key": key}

    def _get_client(self) -> Client:
        if self._client is None:
            timeout = self.config.timeout_s
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                event_hooks={"request": [httpx_request_hook]},  # when it really leaves
            )
            options = types.HttpOptions(
                base_url=self.config.base_url,
                timeout=int(timeout * 1000),  # milliseconds; the SDK's default is no timeout
                httpx_async_client=self._http,
            )
            try:
                self._client = Client(http_options=options, **self._client_kwargs())
            except ProviderError:
                raise
            except Exception as exc:  # e.g. no Application Default Credentials on this machine
                raise ProviderNotConfigured(
                    f"could not create the client: {type(exc).__name__}: {exc}",
                    provider=self.name,
                    model=self.model,
                ) from None
        return self._client

    def _request(self, prompt: Prompt) -> tuple[str, types.GenerateContentConfig]:
        text = prompt.prompt
        if prompt.negative_prompt:
            text += f"\n\nAvoid: {prompt.negative_prompt}"
        image_config = types.ImageConfig(aspect_ratio=prompt.aspect_ratio)
        if self.config.options.get("image_size", True):
            image_config.image_size = prompt.size
        config = types.GenerateContentConfig(
            response_modalities=["IMAGE"], image_config=image_config, seed=prompt.seed
        )
        return text, config

    async def generate(self, prompt: Prompt) -> RawImage:
        client = self._get_client()
        text, config = self._request(prompt)
        try:
            response = await client.aio.models.generate_content(
                model=self.model, contents=text, config=config
            )
        except Exception as exc:
            raise self._translate(exc) from None
        return self._parse(response)

    def _translate(self, exc: Exception) -> Exception:
        """The one place where google-genai's exceptions become imagebatch errors."""
        who = {"provider": self.name, "model": self.model}
        if isinstance(exc, genai_errors.APIError):
            body = exc.details if isinstance(exc.details, dict) else {}
            return google_error(exc.code or 500, body, exc.message or exc.status or "", **who)
        if isinstance(exc, google_auth_errors.DefaultCredentialsError):
            return ProviderNotConfigured(f"no Google Cloud credentials: {exc}", **who)
        if isinstance(exc, google_auth_errors.RefreshError):
            return AuthenticationFailed(f"the credentials could not be refreshed: {exc}", **who)
        if isinstance(exc, pydantic.ValidationError | binascii.Error | ValueError):
            return BadImage(f"the response could not be parsed: {type(exc).__name__}", **who)
        translated = transport_error(exc, timeout_s=self.config.timeout_s, **who)
        return translated if translated is not None else exc

    def _parse(self, response: types.GenerateContentResponse) -> RawImage:
        who = {"provider": self.name, "model": self.model}
        feedback = response.prompt_feedback
        if feedback is not None and feedback.block_reason:
            raise ContentRefused(f"prompt blocked: {_name(feedback.block_reason)}", **who)
        if not response.candidates:
            raise BadImage("the response has no candidates", **who)
        candidate = response.candidates[0]
        reason = _name(candidate.finish_reason)
        if reason in REFUSED_FINISH_REASONS:
            raise ContentRefused(f"no image: finish reason {reason}", **who)
        final = None
        for part in (candidate.content.parts if candidate.content else None) or []:
            blob = part.inline_data
            if part.thought or blob is None or not (blob.mime_type or "").startswith("image/"):
                continue  # interim "thought" images and text parts
            final = blob
        if final is None or not final.data:
            raise BadImage(f"the response has no image (finish reason {reason or 'none'})", **who)
        data = final.data
        if isinstance(data, str):  # defensive: some SDK versions keep base64 text
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise BadImage("the image data is not valid base64", **who) from None
        return RawImage(data=data, mime_type=final.mime_type or "image/png", model=self.model)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()


class VertexGeminiProvider(GeminiProvider):
    """Gemini on Vertex AI. Options: ``project``, ``location`` (default ``global``)."""

    kind: ClassVar[str] = "vertex-gemini"

    def _client_kwargs(self) -> dict[str, Any]:
        options = self.config.options
        project = options.get("project") or self._env.get("GOOGLE_CLOUD_PROJECT")
        if not project:
            raise ProviderNotConfigured(
                "no Google Cloud project: set options.project or GOOGLE_CLOUD_PROJECT",
                provider=self.name,
                model=self.model,
            )
        kwargs: dict[str, Any] = {
            "vertexai": True,
            "project": project,
            "location": options.get("location", "global"),
        }
        if self._credentials is not None:
            kwargs["credentials"] = self._credentials
        return kwargs
