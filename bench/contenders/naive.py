"""The usual practice, written fresh: one prompt after another through google-genai.

A fixed 7 s pause between requests, up to 5 retries with exponential backoff (1, 2, 4, 8, 16 s
plus up to 1 s of jitter) when the error text mentions 429 or 503, no fallback. Every time
constant is divided by the emulator's time scale; the per-call timeout is the same as the
other contenders'.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import arguments, read_prompts, run

PAUSE_S = 7.0
RETRIES = 5
MODEL = "gemini-3-pro-image-preview"


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0])
    from google import genai
    from google.genai import types

    client = genai.Client(
        api_key="bench-key",
        http_options=types.HttpOptions(
            base_url=f"{args.url}/p/primary", timeout=int(args.timeout_s / args.scale * 1000)
        ),
    )
    prompts = read_prompts(args.prompts)
    jitter = random.Random(args.seed)
    config = types.GenerateContentConfig(response_modalities=["IMAGE"])

    def night() -> dict:
        done = failed = 0
        for i, prompt in enumerate(prompts):
            if i:
                time.sleep(PAUSE_S / args.scale)
            for attempt in range(RETRIES + 1):
                try:
                    response = client.models.generate_content(
                        model=MODEL, contents=prompt["prompt"], config=config
                    )
                    parts = response.candidates[0].content.parts
                    if not any(p.inline_data for p in parts):
                        raise RuntimeError("no image in the response")
                    done += 1
                    break
                except Exception as exc:  # the usual practice: look at the text
                    text = str(exc)
                    if attempt == RETRIES or ("429" not in text and "503" not in text):
                        failed += 1
                        break
                    time.sleep((2**attempt + jitter.random()) / args.scale)
        return {"completed": done, "failed": failed}

    run(night)


if __name__ == "__main__":
    main()
