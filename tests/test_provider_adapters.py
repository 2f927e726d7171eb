"""Every adapter through its real SDK, over HTTP, against the project's emulator on localhost."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Iterator

import httpx
import pytest
from google.oauth2.credentials import Credentials
from PIL import Image

from imagebatch import errors
from imagebatch.config import ProviderConfig
from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile, ScriptedFault
from imagebatch.emulator.wire import dimensions, render_image
from imagebatch.models import Prompt
from imagebatch.providers import build_provider
from imagebatch.providers.vertex_endpoint import VertexEndpointProvider

SECRET = "sk-test-SECRET-0123456789"
MODELS = {
    "gemini": "gemini-3-pro-image-preview",
    "vertex-gemini": "gemini-3-pro-image-preview",
    "openai": "gpt-image-1.5",
    "stability": "stable-image-core",
    "vertex-endpoint": "stable-diffusion-xl",
}
KINDS = list(MODELS)
GOOGLE_OPTIONS = {"project": "demo-project", "location": "us-central1", "endpoint": "4242"}


@pytest.fixture
def emulator() -> Iterator:
    """A fresh emulator per test: ``start(**provider_profile_fields)`` returns its server."""
    servers: list[EmulatorServer] = []

    def start(**fields) -> EmulatorServer:
        profile = EmulatorProfile(providers={"primary": ProviderProfile(**fields)})
        servers.append(EmulatorServer(profile).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def _provider(kind: str, url: str, *, timeout_s: float = 5.0, env: dict | None = None, **options):
    config = ProviderConfig(
        name="primary",
        kind=kind,
        model=MODELS[kind],
        base_url=url,
        api_key_env="IMAGEBATCH_TEST_KEY" if kind in ("gemini", "openai", "stability") else None,
        timeout_s=timeout_s,
        options={**(GOOGLE_OPTIONS if kind.startswith("vertex") else {}), **options},
    )
    env = {"IMAGEBATCH_TEST_KEY": SECRET} if env is None else env
    if kind.startswith("vertex"):
        cls = build_provider(config, env).__class__
        return cls(config, env, credentials=Credentials(token=SECRET))
    return build_provider(config, env)


async def _generate(provider, prompt: Prompt):
    try:
        return await provider.generate(prompt)
    finally:
        await provider.aclose()


def _run(kind: str, url: str, prompt: Prompt | None = None, **kwargs):
    prompt = prompt or Prompt(id="p", prompt="a red mug on a table", aspect_ratio="16:9")
    return asyncio.run(_generate(_provider(kind, url, **kwargs), prompt))


def _log(server: EmulatorServer) -> dict:
    return httpx.get(f"{server.url}/_emulator/log").json()


@pytest.mark.parametrize("kind", KINDS)
def test_success_returns_a_decodable_image_of_the_requested_shape(kind, emulator):
    server = emulator(image_px=128)
    image = _run(kind, server.url)
    with Image.open(io.BytesIO(image.data)) as im:
        im.load()
        ratio = im.width / im.height
    expected = 1.5 if kind == "openai" else 16 / 9  # OpenAI offers 3:2 as its landscape size
    assert ratio == pytest.approx(expected, rel=0.02)
    assert image.model == MODELS[kind] and image.mime_type.startswith("image/")
    wires = _log(server)["providers"]["primary"]["wires"]
    expected_wire = {"vertex-gemini": "vertex", "vertex-endpoint": "predict"}.get(kind, kind)
    assert wires == {expected_wire: 1}


ERRORS = {
    "rate_limited_no_hint": (errors.RateLimited, 429),
    "daily_quota": (errors.DailyQuotaExhausted, None),
    "overloaded": (errors.ProviderOverloaded, 503),
    "server_error": (errors.ProviderServerError, 500),
    "bad_gateway": (errors.ProviderServerError, 502),
    "auth": (errors.AuthenticationFailed, None),
    "not_found": (errors.ModelNotFound, 404),
    "bad_request": (errors.InvalidRequest, 400),
    "safety": (errors.ContentRefused, None),
    "empty": (errors.BadImage, None),
    "invalid_base64": (errors.BadImage, None),
}


# Stability answers with raw image bytes: there is no base64 to get wrong
CASES = [(k, f) for k in KINDS for f in sorted(ERRORS) if (k, f) != ("stability", "invalid_base64")]


@pytest.mark.parametrize(("kind", "fault"), CASES)
def test_each_failure_is_classified_by_what_to_do_next(kind, fault, emulator):
    server = emulator(script=[ScriptedFault(first=1, fault=fault)])
    cls, status = ERRORS[fault]
    with pytest.raises(cls) as info:
        _run(kind, server.url)
    err = info.value
    if status is not None:
        assert err.http_status == status
    assert (err.provider, err.model) == ("primary", MODELS[kind])
    assert _log(server)["providers"]["primary"]["requests"] == 1  # the SDK did not retry


HINTS = {"gemini": 2.5, "vertex-gemini": 2.5, "vertex-endpoint": 2.5, "openai": 2.5, "stability": 3}


@pytest.mark.parametrize("kind", KINDS)
def test_rate_limit_hints_are_parsed_to_seconds(kind, emulator):
    server = emulator(hint_s=2.5, script=[ScriptedFault(first=1, fault="rate_limited")])
    with pytest.raises(errors.RateLimited) as info:
        _run(kind, server.url)
    # Google's RetryInfo and OpenAI's retry-after-ms are fractional; Retry-After is whole seconds
    assert info.value.retry_after == pytest.approx(HINTS[kind])


def test_scaled_quota_hints_arrive_as_fractions_of_a_second(emulator):
    profile = EmulatorProfile(time_scale=100, providers={"primary": ProviderProfile(rpm=1)})
    with EmulatorServer(profile) as server:
        _run("gemini", server.url)
        with pytest.raises(errors.RateLimited) as info:
            _run("gemini", server.url)
    assert 0 < info.value.retry_after <= 0.6  # what is left of a 60 s window at 100x


@pytest.mark.parametrize(
    "style", ["prompt_feedback", "image_safety", "prohibited_content", "no_image"]
)
@pytest.mark.parametrize("kind", ["gemini", "vertex-gemini"])
def test_every_gemini_safety_block_is_content_refused_with_its_reason(kind, style, emulator):
    server = emulator(safety_keywords=["forbidden"], safety_style=style)
    with pytest.raises(errors.ContentRefused) as info:
        _run(kind, server.url, Prompt(id="p", prompt="something forbidden"))
    reason = {"prompt_feedback": "PROHIBITED_CONTENT", "image_safety": "IMAGE_SAFETY"}.get(
        style, style.upper()
    )
    assert reason in str(info.value)
    assert info.value.final_status == "blocked"


def test_stability_content_filtered_header_is_a_block(emulator):
    server = emulator(safety_keywords=["forbidden"])
    with pytest.raises(errors.ContentRefused, match="CONTENT_FILTERED"):
        _run("stability", server.url, Prompt(id="p", prompt="forbidden"))


def test_gemini_skips_interim_thought_images_and_takes_the_final_one(emulator):
    server = emulator(thought_images=2, image_px=64)
    prompt = Prompt(id="p", prompt="a lighthouse", aspect_ratio="1:1")
    image = _run("gemini", server.url, prompt)
    assert image.data == render_image("a lighthouse", *dimensions("1:1", 64))
    assert image.data != render_image("draft 0 a lighthouse", *dimensions("1:1", 64))


@pytest.mark.parametrize("kind", KINDS)
def test_a_hang_ends_at_the_configured_timeout(kind, emulator):
    server = emulator(hang_s=120, script=[ScriptedFault(first=1, fault="hang")])
    started = time.monotonic()
    with pytest.raises(errors.ProviderTimeout, match="timeout of 1s"):
        _run(kind, server.url, timeout_s=1.0)
    assert time.monotonic() - started < 20  # the hang lasts 120 s: the client gave up first


def test_the_time_scale_divides_the_timeout_as_it_divides_the_emulators_latencies():
    # at scale 100 a 600 s hang lasts 6 wall seconds; a 120 s timeout is 1.2 wall seconds
    profile = EmulatorProfile(
        time_scale=100,
        providers={
            "primary": ProviderProfile(hang_s=600, script=[ScriptedFault(first=1, fault="hang")])
        },
    )
    server = EmulatorServer(profile).start()
    try:
        config = ProviderConfig(
            name="primary",
            kind="openai",
            model=MODELS["openai"],
            base_url=server.url,
            api_key_env="IMAGEBATCH_TEST_KEY",
            timeout_s=120,
        )
        provider = build_provider(config, {"IMAGEBATCH_TEST_KEY": SECRET}, time_scale=100)
        assert provider.config.timeout_s == pytest.approx(1.2)
        with pytest.raises(errors.ProviderTimeout, match=r"timeout of 1\.2s"):
            asyncio.run(_generate(provider, Prompt(id="p", prompt="a red mug")))
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["gemini", "openai", "stability"])
def test_missing_key_names_the_variable_and_sends_nothing(kind, emulator):
    server = emulator()
    with pytest.raises(errors.ProviderNotConfigured, match="IMAGEBATCH_TEST_KEY is not set"):
        _run(kind, server.url, env={})
    assert _log(server)["providers"] == {}


@pytest.mark.parametrize("kind", KINDS)
def test_no_secret_in_any_error_or_log_line(kind, emulator, caplog):
    faults = [*sorted(ERRORS), "rate_limited", "hang"]
    server = emulator(
        api_key=None,
        hint_s=1,
        hang_s=60,
        script=[ScriptedFault(first=i + 1, fault=f) for i, f in enumerate(faults)],
    )
    caplog.set_level(logging.DEBUG)
    provider = _provider(kind, server.url, timeout_s=1.0)
    seen: list[str] = []

    async def every_fault() -> None:
        for _ in faults:
            try:
                await provider.generate(Prompt(id="p", prompt="x"))
            except errors.ProviderError as exc:
                seen.extend([str(exc), repr(exc), exc.message])
        await provider.aclose()

    asyncio.run(every_fault())
    assert len(seen) >= 3 * (len(faults) - 2)
    text = "\n".join(seen + [r.getMessage() for r in caplog.records])
    assert SECRET not in text


def test_a_wrong_key_is_refused_by_the_emulator_and_classified(emulator):
    server = emulator(api_key="the-right-key")
    with pytest.raises(errors.AuthenticationFailed) as info:
        _run("gemini", server.url)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("message", "cls"),
    [
        ("Failed to make prediction request. Status code:429, response: {}.", errors.RateLimited),
        (
            "Failed to make prediction request. Status code:503, response: x.",
            errors.ProviderOverloaded,
        ),
        ("Failed to make prediction request. Status code:404, response: x.", errors.ModelNotFound),
    ],
)
def test_dedicated_endpoint_value_errors_are_classified_by_their_status(message, cls):
    # google-cloud-aiplatform raises these plain ValueErrors for dedicated endpoints
    # (models.py, Endpoint.predict); dedicated endpoints are reached over https only, so this
    # path is checked on the SDK's message format rather than through the emulator.
    config = ProviderConfig(name="ep", kind="vertex-endpoint", model="sd", options=GOOGLE_OPTIONS)
    provider = VertexEndpointProvider(config, {})
    assert isinstance(provider.translate(ValueError(message)), cls)


def test_providers_share_one_logical_quota_across_wire_formats(emulator):
    server = emulator(rpm=2)
    _run("gemini", server.url)
    _run("openai", server.url)
    with pytest.raises(errors.RateLimited):
        _run("stability", server.url)
    assert _log(server)["providers"]["primary"]["statuses"] == {"200": 2, "429": 1}


@pytest.mark.parametrize("kind", KINDS)
def test_each_adapter_says_when_its_request_really_leaves(kind, emulator):
    # the gate counts a request against the quota from this moment (imagebatch.wire): once per
    # call, before the provider answers (which takes 0.3 s here), never after
    from imagebatch.wire import on_request_sent

    server = emulator(latency_median_s=0.3, image_px=32)
    sent: list[float] = []

    async def call() -> float:
        with on_request_sent(lambda: sent.append(time.monotonic())):
            await _generate(_provider(kind, server.url), Prompt(id="p", prompt="a red mug"))
        return time.monotonic()

    answered = asyncio.run(call())
    assert len(sent) == 1
    assert answered - sent[0] >= 0.29
    assert _log(server)["providers"]["primary"]["statuses"] == {"200": 1}


def test_the_request_counts_as_sent_once_its_last_byte_is_written(emulator):
    # a request hook runs before httpx connects and writes: a busy event loop in between would
    # hide the delay, so the moment reported is httpcore's "request body written" event (and a
    # trace the caller had set still sees every event)
    from imagebatch.wire import httpx_request_hook, on_request_sent

    server = emulator(image_px=32)
    events: list[str] = []
    seen_when_sent: list[list[str]] = []

    async def earlier_trace(name: str, info: dict) -> None:
        events.append(name)

    async def set_trace(request: httpx.Request) -> None:
        request.extensions["trace"] = earlier_trace

    async def call() -> None:
        hooks = {"request": [set_trace, httpx_request_hook]}
        async with httpx.AsyncClient(event_hooks=hooks) as client:
            with on_request_sent(lambda: seen_when_sent.append(list(events))):
                response = await client.get(f"{server.url}/_emulator/log")
        assert response.status_code == 200

    asyncio.run(call())
    assert len(seen_when_sent) == 1
    assert seen_when_sent[0][-1] == "http11.send_request_body.complete"
    assert "http11.receive_response_headers.started" not in seen_when_sent[0]
    assert "http11.receive_response_headers.complete" in events  # the earlier trace saw it all
