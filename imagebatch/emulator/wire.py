"""Each provider's wire format: success bodies, the real error bodies, and the emulator's images.

Shapes follow the public APIs: Gemini's ``generateContent`` (API key and Vertex), OpenAI's
``images/generations``, Stability's ``stable-image/generate`` and a Vertex AI endpoint's
``:predict``. Faults become the status codes, bodies and headers those APIs send.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import math
import random
import struct
import uuid
import zlib
from typing import Any

from PIL import Image, ImageDraw, ImageFilter
from starlette.responses import JSONResponse, Response

from imagebatch.emulator.engine import Decision

__all__ = ["BOMB_BYTES", "CORRUPT_BYTES", "fault_image", "render", "render_image"]

#: a PNG signature followed by junk: "looks like" an image until decoded
CORRUPT_BYTES = b"\x89PNG\r\n\x1a\n" + b"\x00not really an image\x00" * 8
_OVERLOADED = "The model is overloaded. Please try again later."
_HELP = "https://ai.google.dev/gemini-api/docs/rate-limits"


@functools.lru_cache(maxsize=16)
def render_image(
    prompt: str, width: int, height: int, fmt: str = "png", *, blur: bool = False
) -> bytes:
    """A small, non-uniform picture that depends on the prompt (never blank, never the same).

    The last few are kept: a benchmark that repeats prompt texts measures the pipeline, not the
    emulator drawing 4K pictures."""
    rng = random.Random(hashlib.sha256(prompt.encode()).digest())
    top = tuple(rng.randrange(30, 226) for _ in range(3))
    bottom = tuple(rng.randrange(30, 226) for _ in range(3))
    mask = Image.linear_gradient("L").resize((width, height))
    image = Image.composite(
        Image.new("RGB", (width, height), bottom), Image.new("RGB", (width, height), top), mask
    )
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(width), rng.randrange(height)
        r = max(2, rng.randrange(max(3, min(width, height) // 3)))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(radius=max(2, width // 16)))
    out = io.BytesIO()
    image.save(out, format="JPEG" if fmt in ("jpeg", "jpg") else fmt.upper())
    return out.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


#: a valid PNG header claiming 30000x30000 pixels, with almost no data behind it
BOMB_BYTES = (
    b"\x89PNG\r\n\x1a\n"
    + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
    + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
    + _png_chunk(b"IEND", b"")
)


def fault_image(fault: str, prompt: str, width: int, height: int, fmt: str = "png") -> bytes:
    """The image bytes a success answer carries under ``fault`` (a good picture for "ok")."""
    if fault == "corrupt":
        return CORRUPT_BYTES
    if fault == "bomb":
        return BOMB_BYTES
    if fault == "blank":
        out = io.BytesIO()
        Image.new("RGB", (width, height)).save(out, format="PNG")
        return out.getvalue()
    if fault == "wrong_aspect":
        # square unless a square was asked for; then 4:3
        width, height = (max(width, height),) * 2 if width != height else (width, width * 3 // 4)
    data = render_image(prompt, width, height, fmt)
    return data[: len(data) // 2] if fault == "truncated" else data


def dimensions(aspect: str | None, long_side: int) -> tuple[int, int]:
    """Width and height for ``W:H`` or ``WxH`` scaled so the long side is ``long_side``."""
    w, h = 1.0, 1.0
    if aspect:
        for sep in (":", "x"):
            if sep in aspect:
                try:
                    w, h = (float(v) for v in aspect.split(sep, 1))
                except ValueError:
                    w, h = 1.0, 1.0
                break
    if w <= 0 or h <= 0:
        w, h = 1.0, 1.0
    if w >= h:
        return long_side, max(1, round(long_side * h / w))
    return max(1, round(long_side * w / h)), long_side


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def render(wire: str, decision: Decision, request: dict[str, Any], image_px: int) -> Response:
    """The HTTP response for ``decision`` in ``wire`` (gemini, vertex, openai, stability, predict)."""
    return _RENDERERS[wire](decision, request, image_px)


# ---------------------------------------------------------------- Google (Gemini API and Vertex)


def _google_error(
    code: int, status: str, message: str, details: list[dict] | None = None
) -> Response:
    body: dict[str, Any] = {"error": {"code": code, "message": message, "status": status}}
    if details:
        body["error"]["details"] = details
    return JSONResponse(body, status_code=code)


def _quota_429(
    decision: Decision, model: str, limit: int | float | None, per_day: bool
) -> Response:
    quota_id = decision.quota or (
        "GenerateRequestsPerDayPerProjectPerModel"
        if per_day
        else "GenerateRequestsPerMinutePerProjectPerModel"
    )
    metric = "generativelanguage.googleapis.com/generate_content_requests"
    message = (
        "You exceeded your current quota, please check your plan and billing details. For more "
        f"information on this error, head to: {_HELP}.\n* Quota exceeded for metric: {metric}, "
        f"limit: {0 if limit is None else int(limit)}, model: {model}"
    )
    details: list[dict[str, Any]] = [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
                {
                    "quotaMetric": metric,
                    "quotaId": quota_id,
                    "quotaDimensions": {"location": "global", "model": model},
                    "quotaValue": str(0 if limit is None else int(limit)),
                }
            ],
        },
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [{"description": "Learn more", "url": _HELP}],
        },
    ]
    if decision.retry_after_s is not None:
        message += f"\nPlease retry in {decision.retry_after_s:.3f}s."
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": f"{decision.retry_after_s:.3f}s",
            }
        )
    return _google_error(429, "RESOURCE_EXHAUSTED", message, details)


def _google_fault(decision: Decision, request: dict[str, Any], vertex: bool) -> Response | None:
    model = request["model"]
    fault = decision.fault
    if fault == "rate_limited":
        return _quota_429(decision, model, request.get("rpm") or 10, per_day=False)
    if fault == "rate_limited_no_hint":
        message = "Resource has been exhausted (e.g. check quota)."
        details = None
        if decision.retry_after_s is not None:
            details = [
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": f"{decision.retry_after_s:.3f}s",
                }
            ]
        return _google_error(429, "RESOURCE_EXHAUSTED", message, details)
    if fault == "daily_quota":
        return _quota_429(decision, model, request.get("rpd"), per_day=True)
    if fault == "overloaded":
        return _google_error(503, "UNAVAILABLE", _OVERLOADED)
    if fault == "server_error":
        return Response(
            "<html><body><h1>500 Internal Server Error</h1></body></html>",
            500,
            media_type="text/html",
        )
    if fault == "bad_gateway":
        return Response(
            "<html><body><h1>502 Bad Gateway</h1></body></html>", 502, media_type="text/html"
        )
    if fault == "hang":
        return _google_error(
            504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete."
        )
    if fault == "auth":
        if vertex:
            return _google_error(
                403,
                "PERMISSION_DENIED",
                "Permission 'aiplatform.endpoints.predict' denied on resource (or it may not exist).",
            )
        return _google_error(
            400,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                }
            ],
        )
    if fault == "not_found":
        return _google_error(
            404,
            "NOT_FOUND",
            f"models/{model} is not found for API version v1beta, or is not supported for generateContent.",
        )
    if fault == "bad_request":
        return _google_error(400, "INVALID_ARGUMENT", "Request contains an invalid argument.")
    return None


def _gemini(
    decision: Decision, request: dict[str, Any], image_px: int, *, vertex: bool = False
) -> Response:
    error = _google_fault(decision, request, vertex)
    if error is not None:
        return error
    usage = {"promptTokenCount": 12, "candidatesTokenCount": 1290, "totalTokenCount": 1302}
    fault, style = decision.fault, request.get("safety_style", "image_safety")
    if fault == "safety":
        if style == "prompt_feedback":
            return JSONResponse(
                {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": usage}
            )
        if style == "no_image":
            parts = [{"text": "I can't create that image. Try a different prompt."}]
            return JSONResponse(
                {
                    "candidates": [
                        {
                            "content": {"role": "model", "parts": parts},
                            "finishReason": "NO_IMAGE",
                            "index": 0,
                        }
                    ]
                }
            )
        reason = "PROHIBITED_CONTENT" if style == "prohibited_content" else "IMAGE_SAFETY"
        return JSONResponse(
            {"candidates": [{"finishReason": reason, "index": 0}], "usageMetadata": usage}
        )
    if fault == "empty":
        return JSONResponse({"candidates": [], "usageMetadata": usage})

    width, height = dimensions(request.get("aspect_ratio"), image_px)
    if fault == "invalid_base64":
        final = "this is *not* base64!"
    else:
        final = _b64(fault_image(fault, request["prompt"], width, height))
    parts: list[dict[str, Any]] = [
        {
            "inlineData": {
                "mimeType": "image/png",
                "data": _b64(render_image(f"draft {i} {request['prompt']}", width, height)),
            },
            "thought": True,
        }
        for i in range(request.get("thought_images", 0))
    ]
    parts.append({"text": "Here is the image you asked for."})
    parts.append({"inlineData": {"mimeType": "image/png", "data": final}})
    return JSONResponse(
        {
            "candidates": [
                {"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}
            ],
            "usageMetadata": usage,
            "modelVersion": request["model"],
            "responseId": uuid.uuid4().hex[:20],
        }
    )


def _vertex(decision: Decision, request: dict[str, Any], image_px: int) -> Response:
    return _gemini(decision, request, image_px, vertex=True)


def _predict(decision: Decision, request: dict[str, Any], image_px: int) -> Response:
    error = _google_fault(decision, request, vertex=True)
    if error is not None:
        return error
    width, height = dimensions(request.get("aspect_ratio"), image_px)
    if decision.fault == "safety":
        return JSONResponse(
            {
                "predictions": [
                    {"raiFilteredReason": "The image was filtered by the safety policy."}
                ],
                "deployedModelId": "1",
            }
        )
    if decision.fault == "empty":
        return JSONResponse({"predictions": [], "deployedModelId": "1"})
    data = fault_image(decision.fault, request["prompt"], width, height)
    encoded = "this is *not* base64!" if decision.fault == "invalid_base64" else _b64(data)
    return JSONResponse(
        {
            "predictions": [{"bytesBase64Encoded": encoded, "mimeType": "image/png"}],
            "deployedModelId": "1",
            "model": f"projects/{request['project']}/locations/{request['location']}/models/1",
            "modelVersionId": "1",
        }
    )


# ---------------------------------------------------------------- OpenAI


def _openai_headers(request: dict[str, Any], decision: Decision) -> dict[str, str]:
    headers = {"x-request-id": f"req_{uuid.uuid4().hex}"}
    rpm = request.get("rpm")
    if rpm:
        headers["x-ratelimit-limit-requests"] = str(int(rpm))
        headers["x-ratelimit-remaining-requests"] = str(
            max(0, int(request.get("rpm_remaining", rpm)))
        )
        headers["x-ratelimit-reset-requests"] = f"{60 / request.get('scale', 1):.3f}s"
    if decision.retry_after_s is not None:
        headers["retry-after"] = str(max(1, math.ceil(decision.retry_after_s)))
        headers["retry-after-ms"] = f"{decision.retry_after_s * 1000:.0f}"
    return headers


def _openai_error(
    status: int, message: str, type_: str, code: str | None, headers: dict[str, str]
) -> Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _openai(decision: Decision, request: dict[str, Any], image_px: int) -> Response:
    headers = _openai_headers(request, decision)
    model, fault = request["model"], decision.fault
    errors = {
        "rate_limited": (
            429,
            f"Rate limit reached for {model} on requests per min (RPM). Please try again later.",
            "requests",
            "rate_limit_exceeded",
        ),
        "rate_limited_no_hint": (
            429,
            "Too many requests. Please slow down.",
            "requests",
            "rate_limit_exceeded",
        ),
        "daily_quota": (
            429,
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            "insufficient_quota",
        ),
        "overloaded": (
            503,
            "The engine is currently overloaded, please try again later.",
            "server_error",
            None,
        ),
        "server_error": (
            500,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
        ),
        "bad_gateway": (502, "Bad gateway.", "server_error", None),
        "hang": (504, "Gateway timeout.", "server_error", None),
        "auth": (
            401,
            "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            "invalid_api_key",
        ),
        "not_found": (
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        ),
        "bad_request": (400, "Invalid value for 'size'.", "invalid_request_error", "invalid_value"),
        "safety": (
            400,
            "Your request was rejected as a result of our safety system.",
            "image_generation_user_error",
            "moderation_blocked",
        ),
    }
    if fault in errors:
        status, message, type_, code = errors[fault]
        return _openai_error(status, message, type_, code, headers)
    if fault == "empty":
        return JSONResponse({"created": 0, "data": []}, headers=headers)
    width, height = dimensions(request.get("size"), image_px)
    fmt = request.get("output_format") or "png"
    data = fault_image(fault, request["prompt"], width, height, fmt)
    encoded = "this is *not* base64!" if fault == "invalid_base64" else _b64(data)
    return JSONResponse(
        {
            "created": 1764300000,
            "data": [{"b64_json": encoded}],
            "output_format": fmt,
            "size": request.get("size") or "1024x1024",
            "usage": {"input_tokens": 12, "output_tokens": 1056, "total_tokens": 1068},
        },
        headers=headers,
    )


# ---------------------------------------------------------------- Stability AI


def _stability_error(
    status: int, name: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    body = {"id": uuid.uuid4().hex, "name": name, "errors": [message]}
    return JSONResponse(body, status_code=status, headers=headers)


def _stability(decision: Decision, request: dict[str, Any], image_px: int) -> Response:
    fault = decision.fault
    hint = (
        {"retry-after": str(max(1, math.ceil(decision.retry_after_s)))}
        if decision.retry_after_s
        else None
    )
    errors = {
        "rate_limited": (
            429,
            "rate_limit_exceeded",
            "You have exceeded the rate limit of 150 requests within a 10 second period.",
        ),
        "rate_limited_no_hint": (429, "rate_limit_exceeded", "You have exceeded the rate limit."),
        "daily_quota": (
            402,
            "payment_required",
            "Your account lacks sufficient credits to make this request.",
        ),
        "overloaded": (
            503,
            "service_unavailable",
            "The service is temporarily overloaded, please try again later.",
        ),
        "server_error": (
            500,
            "internal_error",
            "An unexpected server error has occurred, please try again later.",
        ),
        "bad_gateway": (502, "bad_gateway", "Bad gateway."),
        "hang": (504, "gateway_timeout", "The request timed out."),
        "auth": (401, "unauthorized", "Missing or invalid API key."),
        "not_found": (404, "not_found", "The requested engine was not found."),
        "bad_request": (
            400,
            "bad_request",
            "aspect_ratio: must be one of 16:9, 1:1, 21:9, 2:3, 3:2, 4:5, 5:4, 9:16, 9:21",
        ),
    }
    if fault in errors:
        status, name, message = errors[fault]
        return _stability_error(status, name, message, hint)
    fmt = request.get("output_format") or "png"
    width, height = dimensions(request.get("aspect_ratio"), image_px)
    finish = "CONTENT_FILTERED" if fault == "safety" else "SUCCESS"
    if fault == "empty":
        data = b""
    elif fault == "safety":
        data = render_image(request["prompt"], width, height, fmt, blur=True)
    else:
        data = fault_image(fault, request["prompt"], width, height, fmt)
    seed = str(request.get("seed") or 0)
    if request.get("accept_json"):
        return JSONResponse({"image": _b64(data), "finish_reason": finish, "seed": int(seed)})
    media = "image/jpeg" if fmt in ("jpeg", "jpg") else f"image/{fmt}"
    return Response(data, media_type=media, headers={"finish-reason": finish, "seed": seed})


_RENDERERS = {
    "gemini": _gemini,
    "vertex": _vertex,
    "predict": _predict,
    "openai": _openai,
    "stability": _stability,
}


def endpoint_resource(project: str, location: str, endpoint: str) -> dict[str, Any]:
    """The Endpoint resource a Vertex AI SDK reads before it predicts."""
    return {
        "name": f"projects/{project}/locations/{location}/endpoints/{endpoint}",
        "displayName": f"emulated-{endpoint}",
        "deployedModels": [
            {
                "id": "1",
                "model": f"projects/{project}/locations/{location}/models/1",
                "displayName": "stable-diffusion",
            }
        ],
        "trafficSplit": {"1": 100},
        "createTime": "2026-01-01T00:00:00Z",
        "updateTime": "2026-01-01T00:00:00Z",
    }


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
