"""Generation: one task run per prompt, each Prefect retry one more attempt."""

from __future__ import annotations

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.logging import get_run_logger
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from imagebatch.errors import ContentRefused
from imagebatch.models import GeneratedImage, Prompt
from imagebatch.runtime import BatchRuntime, is_retryable


async def retry_if_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry only what the error hierarchy calls retryable (429, 503, timeouts, bad bytes)."""
    try:
        await state.aresult()
    except Exception as exc:  # the failed state re-raises the attempt's exception
        return is_retryable(exc)
    return False


@task(
    name="generate_image",
    task_run_name="generate-{prompt.id}",
    retries=4,
    retry_delay_seconds=exponential_backoff(backoff_factor=1),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
    persist_result=False,
)
async def generate_image(
    prompt: Prompt, runtime: BatchRuntime
) -> GeneratedImage | State[ContentRefused]:
    """Generate one prompt's image and check that it decodes.

    Each run is one attempt down the provider chain. A retryable error (429, 503, timeout,
    corrupt bytes) fails the run and Prefect retries it with jittered exponential backoff: the
    UI shows each retry with the provider and the error. A request no provider accepts ends the
    prompt without retries (the run is Failed). A safety block (or a blank image) ends it too,
    but as the provider's answer, not a fault: the run is Completed, named "Blocked", with a
    warning, so red in a night means something went wrong.

    Returns:
        The image bytes with their provider, model, size and price; for a refused prompt, a
        Completed state named "Blocked" whose result is the refusal.
    """
    logger = get_run_logger()
    try:
        image = await runtime.generate(prompt)
    except ContentRefused as exc:
        logger.warning("refused: %s", exc)
        return Completed(name="Blocked", message=str(exc)[:500], data=exc)
    except Exception as exc:
        logger.warning("attempt failed: %s", exc)
        raise
    logger.info(
        "generated %sx%s on %s (%s)", image.width, image.height, image.provider, image.model
    )
    return image


async def refusal(result: GeneratedImage | State) -> ContentRefused | None:
    """The refusal a :func:`generate_image` call returned (as its "Blocked" state), if any."""
    if isinstance(result, State):
        result = await result.aresult(raise_on_failure=False)
    return result if isinstance(result, ContentRefused) else None
