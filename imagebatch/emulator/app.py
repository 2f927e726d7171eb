"""The emulator's HTTP server: every wire format on one port, a path prefix per logical provider.

``/p/{provider}/...`` reaches a named logical provider; paths without the prefix reach the first
one. Control: ``GET /_emulator/log``, ``POST /_emulator/reset``,
``POST /_emulator/providers/{name}`` (a JSON object of profile fields to change).
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from typing import Any

import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from imagebatch.emulator.engine import Emulator
from imagebatch.emulator.profile import EmulatorProfile
from imagebatch.emulator.wire import endpoint_resource, parse_json, render

__all__ = ["EmulatorServer", "create_app"]

_GEMINI = re.compile(r"^(?:v1|v1beta|v1alpha)/models/(?P<model>[^/:]+):generateContent$")
_VERTEX = re.compile(
    r"^(?:v1|v1beta1)/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
    r"/publishers/google/models/(?P<model>[^/:]+):generateContent$"
)
_ENDPOINT = re.compile(
    r"^(?:v1|v1beta1)/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
    r"/endpoints/(?P<endpoint>[^/:]+)(?P<predict>:predict)?$"
)
_OPENAI = re.compile(r"^v1/images/generations$")
_STABILITY = re.compile(r"^v2beta/stable-image/generate/(?P<model>core|ultra|sd3)$")


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:] if auth.lower().startswith("bearer ") else None


def _gemini_text(body: dict[str, Any]) -> str:
    texts = []
    for content in body.get("contents") or []:
        for part in (content or {}).get("parts") or []:
            if isinstance(part, dict) and "text" in part:
                texts.append(str(part["text"]))
    return " ".join(texts)


async def _parse(
    wire: str, match: re.Match[str], request: Request
) -> tuple[dict[str, Any], str | None]:
    """The fields the emulator needs from a request, and the credential it carried."""
    fields: dict[str, Any] = dict(match.groupdict())
    if wire == "stability":
        form = await request.form()
        fields.update(
            prompt=str(form.get("prompt", "")),
            aspect_ratio=form.get("aspect_ratio"),
            seed=form.get("seed"),
            output_format=form.get("output_format"),
            accept_json="application/json" in request.headers.get("accept", ""),
        )
        fields["model"] = f"stable-image-{fields['model']}"
        return fields, _bearer(request)
    body = parse_json(await request.body())
    if wire in ("gemini", "vertex"):
        config = body.get("generationConfig") or {}
        image = config.get("imageConfig") or {}
        fields.update(
            prompt=_gemini_text(body),
            aspect_ratio=image.get("aspectRatio"),
            size=image.get("imageSize"),
        )
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        return fields, key if wire == "gemini" else _bearer(request)
    if wire == "openai":
        fields.update(
            model=str(body.get("model") or "gpt-image-1"),
            prompt=str(body.get("prompt", "")),
            size=body.get("size"),
            output_format=body.get("output_format"),
        )
        return fields, _bearer(request)
    instances = body.get("instances") or [{}]
    first = instances[0] if isinstance(instances[0], dict) else {}
    params = body.get("parameters") or {}
    fields.update(
        model=fields["endpoint"],
        prompt=str(first.get("prompt", "")),
        aspect_ratio=params.get("aspectRatio") or first.get("aspect_ratio"),
    )
    return fields, _bearer(request)


async def _wait(seconds: float, emulator: Emulator) -> None:
    """Sleep ``seconds``, but wake early when the server stops (hangs must not block shutdown)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not emulator.closing.is_set():
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        await asyncio.sleep(min(remaining, 0.1))


def _route(path: str) -> tuple[str, re.Match[str]] | None:
    """Which wire format a path speaks, and its parameters."""
    for wire, pattern in (
        ("gemini", _GEMINI),
        ("vertex", _VERTEX),
        ("predict", _ENDPOINT),
        ("openai", _OPENAI),
        ("stability", _STABILITY),
    ):
        match = pattern.match(path)
        if match:
            return wire, match
    return None


def create_app(emulator: Emulator) -> Starlette:
    """The ASGI app serving ``emulator``."""

    async def handle(request: Request) -> Response:
        path = request.path_params["path"]
        provider = emulator.default_provider
        if path.startswith("p/"):
            _, provider, path = [*path.split("/", 2), ""][:3]
            if provider not in emulator.profile.providers:
                return JSONResponse({"error": f"no logical provider {provider!r}"}, status_code=404)
        routed = _route(path)
        if routed is None:
            return JSONResponse(
                {"error": f"the emulator does not serve {request.method} /{path}"}, status_code=404
            )
        wire, match = routed

        if wire == "predict" and not match.group("predict"):
            if request.method != "GET":
                return JSONResponse({"error": "method not allowed"}, status_code=405)
            return JSONResponse(
                endpoint_resource(match["project"], match["location"], match["endpoint"])
            )
        if request.method != "POST":
            return JSONResponse({"error": "method not allowed"}, status_code=405)

        fields, key = await _parse(wire, match, request)
        decision = emulator.decide(
            provider, wire=wire, model=fields["model"], prompt=fields["prompt"], api_key=key
        )
        started = time.monotonic()
        profile = emulator.profile.providers[provider]
        fields.update(
            rpm=profile.rpm,
            rpd=profile.rpd,
            scale=emulator.scale,
            safety_style=profile.safety_style,
            thought_images=profile.thought_images,
        )
        await _wait(decision.latency_s, emulator)
        response = await asyncio.to_thread(render, wire, decision, fields, profile.image_px)
        emulator.finish(decision, response.status_code, time.monotonic() - started)
        return response

    async def log(request: Request) -> Response:
        return JSONResponse(emulator.snapshot())

    async def reset(request: Request) -> Response:
        emulator.reset()
        return JSONResponse({"ok": True})

    async def update(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in emulator.profile.providers:
            return JSONResponse({"error": f"no logical provider {name!r}"}, status_code=404)
        try:
            profile = emulator.update_provider(name, parse_json(await request.body()))
        except ValidationError as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        return JSONResponse(profile.model_dump())

    return Starlette(
        routes=[
            Route("/_emulator/log", log, methods=["GET"]),
            Route("/_emulator/reset", reset, methods=["POST"]),
            Route("/_emulator/providers/{name}", update, methods=["POST"]),
            Route("/{path:path}", handle, methods=["GET", "POST"]),
        ]
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmulatorServer:
    """The emulator on a localhost port, in a background thread (tests, demos, benchmarks)."""

    def __init__(self, profile: EmulatorProfile, *, port: int | None = None):
        self.emulator = Emulator(profile)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(self.emulator),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, name="imagebatch-emulator", daemon=True
        )

    def provider_url(self, name: str) -> str:
        """Base URL that reaches logical provider ``name`` in every wire format."""
        return f"{self.url}/p/{name}"

    def start(self, timeout: float = 30.0) -> EmulatorServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the emulator did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.emulator.closing.set()
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
