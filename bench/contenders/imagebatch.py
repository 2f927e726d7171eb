"""imagebatch: the real nightly flow, with a production-like config, on a Prefect server.

The primary speaks the Gemini wire format (google-genai), the backup OpenAI's (openai SDK);
imagebatch's own time constants are divided by IMAGEBATCH_TIME_SCALE, which bench/night.py
sets to the emulator's scale. PREFECT_API_URL names the server the runs are recorded on.
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


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0])
    from flows.nightly_batch import nightly_batch
    from imagebatch.batch import BatchRun

    work = Path(args.work)
    config = work / "config.yaml"
    # the client timeout is in wall seconds: the emulator's latencies are scaled too
    config.write_text(
        CONFIG.format(
            url=args.url, timeout=args.timeout_s / args.scale, probe=args.probe_interval_s
        )
    )

    def night() -> dict:
        state = asyncio.run(
            nightly_batch(
                run=BatchRun(
                    prompts=args.prompts,
                    config=str(config),
                    output=str(work / "out"),
                    batch_id="night",
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
