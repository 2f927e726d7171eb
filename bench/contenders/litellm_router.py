"""LiteLLM's Router, as its documentation sets it up for reliability, against the emulator.

The primary and the backup are two model groups reached through the OpenAI-compatible wire
format, with ``fallbacks=[{"primary": ["backup"]}]``, ``num_retries=2``, ``allowed_fails=3``
and a cooldown (``cooldown_time``) as long as imagebatch's probe interval; LiteLLM honours
``Retry-After`` itself. Time constants (cooldown, timeout) are divided by the time scale. At
most ``--in-flight`` prompts are worked on at once, the same as imagebatch's ``max_in_flight``.

Runs in the benchmark-only environment bench/.venv-litellm (bench/night.py creates it).
"""

from __future__ import annotations

import os

# offline: no cost map download at import (TESTING-NOTES)
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import arguments, read_prompts, run

IN_FLIGHT = 40


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0])
    import litellm
    from litellm import Router

    litellm.suppress_debug_info = True
    timeout = args.timeout_s / args.scale

    def deployment(name: str, model: str) -> dict:
        return {
            "model_name": name,
            "litellm_params": {
                "model": f"openai/{model}",
                "api_base": f"{args.url}/p/{name}/v1",
                "api_key": "bench-key",
                "timeout": timeout,
            },
        }

    router = Router(
        model_list=[
            deployment("primary", "gemini-3-pro-image-preview"),
            deployment("backup", "gpt-image-1.5"),
        ],
        fallbacks=[{"primary": ["backup"]}],
        num_retries=2,
        allowed_fails=3,
        cooldown_time=args.probe_interval_s / args.scale,
        timeout=timeout,
    )
    prompts = read_prompts(args.prompts)

    async def night() -> dict:
        slots = asyncio.Semaphore(IN_FLIGHT)
        outcome = {"completed": 0, "failed": 0}

        async def one(prompt: dict) -> None:
            async with slots:
                try:
                    response = await router.aimage_generation(
                        model="primary", prompt=prompt["prompt"], n=1, size="1024x1024"
                    )
                    if not response.data:
                        raise RuntimeError("no image in the response")
                    outcome["completed"] += 1
                except Exception:
                    outcome["failed"] += 1

        await asyncio.gather(*(one(p) for p in prompts))
        return outcome

    run(lambda: asyncio.run(night()))


if __name__ == "__main__":
    main()
