"""The moment a request really leaves, for the gate that paced it.

A provider counts a request against its per-minute quota when it arrives, not when imagebatch's
gate let it go. Between the two lie creating the SDK's client on a first call, the SDK's own
work and a busy event loop: a first call that leaves a few seconds late and an eleventh call
that leaves on time land in the same minute, and the eleventh gets a 429. So the router sets a
hook for the call it makes (a context variable: concurrent calls each see their own); each
provider's HTTP client calls it once the request's last byte is written (httpx clients, through
:func:`httpx_request_hook`) or just before a blocking SDK sends it (:func:`request_sent`); the
gate counts that moment, not the admission, against the provider's window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = ["httpx_request_hook", "on_request_sent", "request_sent"]

_HOOK: ContextVar[Callable[[], None] | None] = ContextVar("imagebatch_request_sent", default=None)


@contextmanager
def on_request_sent(hook: Callable[[], None]) -> Iterator[None]:
    """Within this block, :func:`request_sent` calls ``hook`` (in this task and its threads)."""
    token = _HOOK.set(hook)
    try:
        yield
    finally:
        _HOOK.reset(token)


def request_sent() -> None:
    """A provider's request is leaving now (no-op outside :func:`on_request_sent`)."""
    hook = _HOOK.get()
    if hook is not None:
        hook()


#: httpcore's trace events (httpx and openai's httpx2 alike) once a request's last byte is written
_WRITTEN = ("http11.send_request_body.complete", "http2.send_request_body.complete")


async def httpx_request_hook(request: Any) -> None:
    """For ``httpx.AsyncClient(event_hooks={"request": [httpx_request_hook]})``.

    The hook runs before httpx connects and writes; a busy event loop in between (Prefect
    creating task runs) would hide the delay, so it asks httpcore to say when the request's
    last byte is on the socket (its ``trace`` extension) and calls the router's hook then.
    """
    hook = _HOOK.get()
    if hook is None:
        return
    earlier = request.extensions.get("trace")

    async def trace(name: str, info: dict[str, Any]) -> None:
        if earlier is not None:
            await earlier(name, info)
        if name in _WRITTEN:
            hook()

    request.extensions["trace"] = trace
