"""A self-deployed model (e.g. Stable Diffusion) on a Vertex AI endpoint (google-cloud-aiplatform).

``Endpoint.predict`` is synchronous, so it runs in a worker thread. aiplatform keeps its API
endpoint and transport in process-wide settings; they are set under a lock only while this
provider's clients are built (the clients keep them afterwards). ``base_url`` selects the REST
transport against that URL (the emulator, a private gateway); without it the SDK's defaults apply.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import threading
from collections.abc import Mapping
from typing import Any, ClassVar

from google.api_core import exceptions as core_errors
from google.auth import exceptions as google_auth_errors

from imagebatch.config import ProviderConfig
from imagebatch.errors import (
    AuthenticationFailed,
    BadImage,
    ContentRefused,
    ProviderNotConfigured,
)
from imagebatch.models import Prompt
from imagebatch.providers._errors import error_for_status, google_error, transport_error
from imagebatch.providers.base import ImageProvider, RawImage
from imagebatch.wire import request_sent

__all__ = ["VertexEndpointProvider"]

_INIT_LOCK = threading.Lock()
#: how a dedicated endpoint reports a failed request: a plain ValueError with the status in text
_DEDICATED = re.compile(r"Status code:\s*(\d{3})", re.IGNORECASE)
#: google-api-core prefixes REST errors with the request line, URL included: not for users
_REQUEST_PREFIX = re.compile(r"^(?:GET|POST|PUT|PATCH|DELETE) \S+: ")


class VertexEndpointProvider(ImageProvider):
    """Options: ``project``, ``location``, ``endpoint`` (id or full name), ``dedicated``."""

    kind: ClassVar[str] = "vertex-endpoint"

    def __init__(self, config: ProviderConfig, env: Mapping[str, str], *, credentials: Any = None):
        super().__init__(config, env)
        self._env = env
        self._credentials = credentials
        self._endpoint: Any = None

    def _get_endpoint(self) -> Any:
        if self._endpoint is not None:
            return self._endpoint
        options = self.config.options
        who = {"provider": self.name, "model": self.model}
        project = options.get("project") or self._env.get("GOOGLE_CLOUD_PROJECT")
        endpoint = options.get("endpoint")
        if not project or not endpoint:
            raise ProviderNotConfigured(
                "set options.project (or GOOGLE_CLOUD_PROJECT) and options.endpoint", **who
            )
        from google.cloud import aiplatform

        location = options.get("location", "us-central1")
        init: dict[str, Any] = {"project": project, "location": location}
        if self._credentials is not None:
            init["credentials"] = self._credentials
        if self.config.base_url:
            init.update(api_endpoint=self.config.base_url.rstrip("/"), api_transport="rest")
        try:
            with _INIT_LOCK:
                aiplatform.init(**init)
                resource = aiplatform.Endpoint(
                    endpoint, project=project, location=location, credentials=self._credentials
                )
                resource._prediction_client  # noqa: B018 - build it while the settings are ours
        except google_auth_errors.DefaultCredentialsError as exc:
            raise ProviderNotConfigured(f"no Google Cloud credentials: {exc}", **who) from None
        self._endpoint = resource
        return resource

    def _instance(self, prompt: Prompt) -> tuple[dict[str, Any], dict[str, Any]]:
        instance: dict[str, Any] = {"prompt": prompt.prompt}
        if prompt.negative_prompt:
            instance["negative_prompt"] = prompt.negative_prompt
        if prompt.seed is not None:
            instance["seed"] = prompt.seed
        parameters = {"aspectRatio": prompt.aspect_ratio, "sampleCount": 1}
        return instance, parameters

    async def generate(self, prompt: Prompt) -> RawImage:
        instance, parameters = self._instance(prompt)
        dedicated = bool(self.config.options.get("dedicated", False))

        def call() -> Any:
            endpoint = self._get_endpoint()
            request_sent()  # its client is ready: the request leaves now
            return endpoint.predict(
                instances=[instance],
                parameters=parameters,
                timeout=self.config.timeout_s,
                use_dedicated_endpoint=dedicated,
            )

        try:
            prediction = await asyncio.to_thread(call)
        except Exception as exc:
            raise self.translate(exc) from None
        return self._parse(prediction.predictions)

    def translate(self, exc: BaseException) -> BaseException:
        """The one place where aiplatform's exceptions become imagebatch errors."""
        who = {"provider": self.name, "model": self.model}
        if isinstance(exc, ProviderNotConfigured):
            return exc
        if isinstance(exc, core_errors.DeadlineExceeded):
            return transport_error(TimeoutError(), timeout_s=self.config.timeout_s, **who) or exc
        if isinstance(exc, core_errors.GoogleAPICallError) and exc.code is not None:
            message = _REQUEST_PREFIX.sub("", exc.message or str(exc))
            details = [d for d in (exc.details or []) if isinstance(d, dict)]
            body = {"error": {"message": message, "details": details}}
            return google_error(int(exc.code), body, message, **who)
        if isinstance(exc, google_auth_errors.RefreshError):
            return AuthenticationFailed(f"the credentials could not be refreshed: {exc}", **who)
        if isinstance(exc, ValueError):  # dedicated endpoints: the status code is in the text
            match = _DEDICATED.search(str(exc))
            if match:
                return error_for_status(int(match.group(1)), str(exc)[:500], **who)
        translated = transport_error(exc, timeout_s=self.config.timeout_s, **who)
        return translated if translated is not None else exc

    def _parse(self, predictions: list[Any]) -> RawImage:
        who = {"provider": self.name, "model": self.model}
        if not predictions:
            raise BadImage("the endpoint returned no predictions", **who)
        first = predictions[0]
        mime = "image/png"
        if isinstance(first, dict):
            if first.get("raiFilteredReason"):
                raise ContentRefused(str(first["raiFilteredReason"]), **who)
            mime = str(first.get("mimeType") or mime)
            first = first.get("bytesBase64Encoded") or first.get("image") or ""
        if not isinstance(first, str) or not first:
            raise BadImage("the prediction has no image", **who)
        try:
            data = base64.b64decode(first, validate=True)
        except (binascii.Error, ValueError):
            raise BadImage("the image data is not valid base64", **who) from None
        return RawImage(data=data, mime_type=mime, model=self.model)
