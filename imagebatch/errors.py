"""Errors, classified by what the caller does next.

::

    ImageBatchError
    ├── InputError                  bad input from the user; the batch does not start
    │   ├── ConfigError             the YAML config (file, line, key)
    │   └── PromptFileError         the prompt file (file, line, field)
    ├── BatchLockedError            another run holds this batch id
    ├── StorageError                the sink could not read or write an object
    └── ProviderError               one generation attempt failed (provider, model, http_status)
        ├── RetryableError          retry later on this provider (optional ``retry_after`` seconds)
        │   ├── RateLimited         429 with or without a hint
        │   ├── ProviderOverloaded  503 "The model is overloaded"
        │   ├── ProviderServerError 500, 502, 504
        │   ├── ProviderTimeout     the call took longer than the provider's timeout
        │   ├── ProviderConnectionError
        │   └── BadImage            empty, corrupt or undecodable image bytes
        ├── MoveOnError             try the next provider in the chain, now
        │   ├── DailyQuotaExhausted
        │   ├── AuthenticationFailed
        │   ├── ModelNotFound       404: the model is unknown or retired
        │   └── ProviderNotConfigured
        └── GiveUpError             end this prompt with the reason
            ├── ContentRefused      safety block (status ``blocked``)
            │   └── BlankImage      a blank or uniform image: a silent filter, or a fault when
            │                       one provider sends three in a row (then: move on)
            ├── InvalidRequest      400 that no provider would accept
            ├── ProvidersExhausted  every provider in the chain declined (status ``failed``)
            └── NotTried            never sent (status ``skipped``)
                ├── BudgetReached   the batch's spend cap
                ├── DeadlineReached the batch's deadline
                └── QuotaGone       every provider's daily quota is used up

A record that ends without images stores its error's kind (:func:`error_kind`: the class name,
or ``FaultyProvider`` for a chain emptied by a provider that sent blank images prompt after
prompt), and the night's outcome is judged from the kinds, never from the messages.

Messages never carry secrets: adapters build them from the server's message, never from
request headers or client configuration.
"""

from __future__ import annotations

__all__ = [
    "FAULTY_PROVIDER",
    "AuthenticationFailed",
    "BadImage",
    "BatchLockedError",
    "BlankImage",
    "BudgetReached",
    "ConfigError",
    "ContentRefused",
    "DailyQuotaExhausted",
    "DeadlineReached",
    "GiveUpError",
    "ImageBatchError",
    "InputError",
    "InvalidRequest",
    "ModelNotFound",
    "MoveOnError",
    "NotTried",
    "PromptFileError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderNotConfigured",
    "ProviderOverloaded",
    "ProviderServerError",
    "ProviderTimeout",
    "ProvidersExhausted",
    "QuotaGone",
    "RateLimited",
    "RetryableError",
    "StorageError",
    "error_kind",
]


class ImageBatchError(Exception):
    """Base of every error imagebatch raises on purpose."""


class InputError(ImageBatchError):
    """Input the user must fix; raised before any image is generated."""


def _where(source: str, line: int | None, name: str | None, label: str) -> str:
    place = source
    if line is not None:
        place += f", line {line}"
    if name:
        place += f", {label} '{name}'"
    return place


class ConfigError(InputError):
    """The configuration is invalid; the message names the file, line and key."""

    def __init__(
        self, message: str, *, source: str, line: int | None = None, key: str | None = None
    ):
        self.source, self.line, self.key, self.reason = source, line, key, message
        super().__init__(f"{_where(source, line, key, 'key')}: {message}")


class PromptFileError(InputError):
    """A prompt file is missing, empty or has bad rows; names the file, line and field."""

    def __init__(
        self, message: str, *, source: str, line: int | None = None, field: str | None = None
    ):
        self.source, self.line, self.field, self.reason = source, line, field, message
        super().__init__(f"{_where(source, line, field, 'field')}: {message}")


class BatchLockedError(ImageBatchError):
    """Another run is working on the same batch id right now."""


class StorageError(ImageBatchError):
    """Reading or writing an object in the sink failed."""


class ProviderError(ImageBatchError):
    """One generation attempt failed; carries the provider, model and HTTP status."""

    #: the prompt status this error leaves behind when it ends the prompt
    final_status = "failed"

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        model: str = "",
        http_status: int | None = None,
        retry_after: float | None = None,
    ):
        self.message = message
        self.provider = provider
        self.model = model
        self.http_status = http_status
        self.retry_after = retry_after
        super().__init__(message)

    def __str__(self) -> str:
        who = "/".join(p for p in (self.provider, self.model) if p)
        status = f" HTTP {self.http_status}" if self.http_status else ""
        hint = f" (retry after {self.retry_after:g}s)" if self.retry_after is not None else ""
        prefix = f"[{who}{status}] " if who or status else ""
        return f"{prefix}{type(self).__name__}: {self.message}{hint}"

    def __repr__(self) -> str:
        # Prefect's retry log line shows the repr: make it name the provider and status too
        return f"<{self}>"


class RetryableError(ProviderError):
    """Transient: the same provider may succeed later."""


class RateLimited(RetryableError):
    """429: too many requests for the quota right now."""


class ProviderOverloaded(RetryableError):
    """503: the provider's shared capacity is full."""


class ProviderServerError(RetryableError):
    """500, 502 or 504 from the provider."""


class ProviderTimeout(RetryableError):
    """The call did not finish within the provider's configured timeout."""


class ProviderConnectionError(RetryableError):
    """The provider could not be reached."""


class BadImage(RetryableError):
    """The provider answered, but the bytes are not a usable image."""


class MoveOnError(ProviderError):
    """This provider cannot serve the prompt now; the next one in the chain may."""


class DailyQuotaExhausted(MoveOnError):
    """The provider's daily allowance is used up (or its limit is 0)."""


class AuthenticationFailed(MoveOnError):
    """The provider rejected the credentials (401/403)."""


class ModelNotFound(MoveOnError):
    """The model is unknown to the provider or has been retired (404)."""


class ProviderNotConfigured(MoveOnError):
    """The provider lacks what it needs to run (for example its API key)."""


class GiveUpError(ProviderError):
    """No retry or other provider will help; the prompt ends with this reason."""


class ContentRefused(GiveUpError):
    """The provider refused the content (safety block)."""

    final_status = "blocked"


class BlankImage(ContentRefused):
    """A blank or near-uniform image: some providers' silent safety filter. Three in a row from
    one provider say the provider is at fault, not the prompts (the router stops using it)."""


class InvalidRequest(GiveUpError):
    """The request is malformed for every provider (400)."""


class ProvidersExhausted(GiveUpError):
    """Every provider in the chain declined this prompt (auth, model gone, not configured).

    ``faulty``: one of them was taken out for sending blank images prompt after prompt.
    """

    def __init__(self, message: str, *, faulty: bool = False, **kwargs):
        super().__init__(message, **kwargs)
        self.faulty = faulty


class NotTried(GiveUpError):
    """The prompt was not sent to any provider; it is recorded as skipped, with the reason."""

    final_status = "skipped"


class BudgetReached(NotTried):
    """Sending the prompt would take the batch over its spend cap."""


class DeadlineReached(NotTried):
    """The batch's deadline passed before the prompt could be sent."""


class QuotaGone(NotTried):
    """Every provider's daily quota is used up until its reset."""


#: the kind of a prompt that failed because a provider sending blank images emptied the chain
FAULTY_PROVIDER = "FaultyProvider"


def error_kind(error: BaseException) -> str:
    """What ended a prompt, as its record stores it: the error's class name (``BlankImage``,
    ``ProvidersExhausted``, ``BudgetReached``, ...), or :data:`FAULTY_PROVIDER`."""
    if isinstance(error, ProvidersExhausted) and error.faulty:
        return FAULTY_PROVIDER
    return type(error).__name__
