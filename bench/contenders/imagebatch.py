"""imagebatch: the real nightly flow on a Prefect server, tuned or on a new user's defaults.

Variants (``--variant``):
- ``tuned`` (the default): the primary in the Gemini wire format (google-genai), the backup in
  OpenAI's (openai SDK), in-flight caps sized by hand and ``spill_over_s: 60``;
- ``defaults``: what a new user writes for two accounts of one model: both in the Gemini wire
  format with the same model id, quotas and prices only;
- ``chain``: the tuned run's two models (Gemini, then OpenAI), quotas and prices only;
- ``finish-by``: ``chain`` with ``finish_by`` set FINISH_BY_MIN simulated minutes after the start.

imagebatch's own time constants (timeouts included) are divided by IMAGEBATCH_TIME_SCALE, which
bench/night.py sets to the emulator's scale. PREFECT_API_URL names the server of the runs.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

from _harness import arguments, run  # noqa: E402

CONFIG = """
providers:
  - name: primary
    kind: gemini
    model: gemini-3-pro-image-preview
    base_url: {url}/p/primary
    api_key_env: BENCH_KEY
    limits: {{rpm: 10, max_in_flight: 24}}
    price_usd: {{1K: 0.134}}
    timeout_s: {timeout}
  - name: backup
    kind: openai
    model: gpt-image-1.5
    base_url: {url}/p/backup
    api_key_env: BENCH_KEY
    limits: {{rpm: 5, max_in_flight: 12}}
    price_usd: {{1K: 0.04}}
    timeout_s: {timeout}
routing: {{failover_after: 3, probe_interval_s: {probe}, spill_over_s: 60}}
renditions: [{{name: original, format: png}}]
publish: {{latest_index: false}}
max_in_flight: 40
"""

#: what a new user writes: the chain, keys, quotas and prices; every other setting its default
DEFAULTS = """
providers:
  - name: primary
    kind: gemini
    model: gemini-3-pro-image-preview
    base_url: {url}/p/primary
    api_key_env: BENCH_KEY
    limits: {{rpm: 10}}
    price_usd: {{1K: 0.134}}
  - name: backup
    kind: {backup_kind}
    model: {backup_model}
    base_url: {url}/p/backup
    api_key_env: BENCH_KEY
    limits: {{rpm: 5}}
    price_usd: {{1K: {backup_price}}}
renditions: [{{name: original, format: png}}]
publish: {{latest_index: false}}
"""
#: the finish-by variant's target, simulated minutes after the start (the primary alone needs
#: about 21 for 200 prompts, both quotas together about 14)
FINISH_BY_MIN = 18.0


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0])
    from imagebatch.batch import BatchRun
    from imagebatch.flows.nightly_batch import nightly_batch

    work = Path(args.work)
    config = work / "config.yaml"
    variant = args.variant or "tuned"
    if variant == "tuned":  # times in simulated seconds, as in the config; the scale divides
        text = CONFIG.format(url=args.url, timeout=args.timeout_s, probe=args.probe_interval_s)
    elif variant == "defaults":  # a second account of the same model
        text = DEFAULTS.format(
            url=args.url,
            backup_kind="gemini",
            backup_model="models/gemini-3-pro-image-preview",
            backup_price=0.134,
        )
    elif variant in ("chain", "finish-by"):
        text = DEFAULTS.format(
            url=args.url, backup_kind="openai", backup_model="gpt-image-1.5", backup_price=0.04
        )
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    config.write_text(text)

    def night() -> dict:
        finish_by = None
        if variant == "finish-by":  # the router divides the time left by the time scale
            from datetime import UTC, datetime, timedelta

            finish_by = (datetime.now(UTC) + timedelta(minutes=FINISH_BY_MIN)).isoformat()
        state = asyncio.run(
            nightly_batch(
                run=BatchRun(
                    prompts=args.prompts,
                    config=str(config),
                    output=str(work / "out"),
                    batch_id="night",
                    finish_by=finish_by,
                ),
                return_state=True,
            )
        )
        summary = state.result(raise_on_failure=False)
        return {
            "state": state.name,
            "completed": getattr(summary, "succeeded", 0),
            "failed": getattr(summary, "failed", 0),
        }

    run(night)


if __name__ == "__main__":
    main()
