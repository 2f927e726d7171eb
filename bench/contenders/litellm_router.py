"""LiteLLM's Router set up as its documentation recommends for reliability, against the emulator.

Two model groups reached through the OpenAI-compatible wire format, each deployment with its
``rpm`` and ``routing_strategy="usage-based-routing-v2"`` (the strategy that respects it),
``fallbacks=[{"primary": ["backup"]}]``, ``num_retries`` with a ``RetryPolicy`` per error class
(rate limits and overloads retried most, bad requests and content refusals never),
``allowed_fails`` and a cooldown as long as imagebatch's probe interval; LiteLLM honours
``Retry-After`` itself. At most rate x latency prompts in flight (the two deployments' 7.5 and
2.5: 10). Variant ``loop`` adds the outer loop a competent user writes around it: the prompts
that failed go round again, up to 5 rounds.

LiteLLM counts ``rpm`` per wall-clock minute: at time scale S a deployment is given S x its rpm
per wall minute, so its window spans S simulated minutes and admits bursts that the emulator's
sliding 60 s window refuses; run it at a low scale (bench/night.py runs it at 2). Time constants
(cooldown, timeout) are divided by the time scale.

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

#: the scenarios' quotas and median latencies (bench/night.py): 10 RPM x 45 s, 5 RPM x 30 s
DEPLOYMENTS = {"primary": ("gemini-3-pro-image-preview", 10), "backup": ("gpt-image-1.5", 5)}
IN_FLIGHT = 10  # 10/60 x 45 + 5/60 x 30
ROUNDS = 5  # the outer loop's rounds (variant "loop")


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0])
    import litellm
    from litellm import Router
    from litellm.router import RetryPolicy

    litellm.suppress_debug_info = True
    timeout = args.timeout_s / args.scale

    def deployment(name: str) -> dict:
        model, rpm = DEPLOYMENTS[name]
        return {
            "model_name": name,
            "litellm_params": {
                "model": f"openai/{model}",
                "api_base": f"{args.url}/p/{name}/v1",
                "api_key": "bench-key",
                "timeout": timeout,
                # per wall-clock minute: S simulated minutes at time scale S
                "rpm": round(rpm * args.scale),
            },
        }

    router = Router(
        model_list=[deployment("primary"), deployment("backup")],
        routing_strategy="usage-based-routing-v2",
        fallbacks=[{"primary": ["backup"]}],
        num_retries=3,
        retry_policy=RetryPolicy(
            RateLimitErrorRetries=5,
            ServiceUnavailableErrorRetries=3,
            InternalServerErrorRetries=3,
            TimeoutErrorRetries=2,
            BadRequestErrorRetries=0,
            ContentPolicyViolationErrorRetries=0,
            AuthenticationErrorRetries=0,
        ),
        allowed_fails=3,
        cooldown_time=args.probe_interval_s / args.scale,
        timeout=timeout,
    )
    prompts = read_prompts(args.prompts)
    rounds = ROUNDS if args.variant == "loop" else 1

    async def night() -> dict:
        slots = asyncio.Semaphore(IN_FLIGHT)
        outcome = {"completed": 0, "failed": 0, "rounds": 0}

        async def one(prompt: dict) -> bool:
            async with slots:
                try:
                    response = await router.aimage_generation(
                        model="primary", prompt=prompt["prompt"], n=1, size="1024x1024"
                    )
                except Exception:
                    return False
                return bool(response.data)

        left = prompts
        for _ in range(rounds):
            outcome["rounds"] += 1
            done = await asyncio.gather(*(one(p) for p in left))
            outcome["completed"] += sum(done)
            left = [p for p, ok in zip(left, done, strict=True) if not ok]
            if not left:
                break
        outcome["failed"] = len(left)
        return outcome

    run(lambda: asyncio.run(night()))


if __name__ == "__main__":
    main()
