from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime

import pytest

from imagebatch.batch import default_batch_id, summarize
from imagebatch.config import parse_config
from imagebatch.errors import (
    AuthenticationFailed,
    BadImage,
    ContentRefused,
    GiveUpError,
    ModelNotFound,
    ProviderOverloaded,
    ProvidersExhausted,
)
from imagebatch.models import Prompt, PromptRecord
from imagebatch.providers import REGISTRY
from imagebatch.resilience import MemoryUsageStore
from imagebatch.runtime import BatchRuntime, is_retryable
from imagebatch.storage import LocalSink
from tests.scripted import SCRIPTS, ScriptedProvider, png

CHAIN = """
providers:
  - {name: primary, kind: local, model: m1, price_usd: {1K: 0.05}}
  - {name: backup, kind: local, model: m2, price_usd: {1K: 0.08}}
renditions: [{name: original, format: png}]
"""


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, "local", ScriptedProvider)
    SCRIPTS.clear()
    config = parse_config(CHAIN, source="t")
    yield BatchRuntime(config, LocalSink(tmp_path), "b1", env={}, store=MemoryUsageStore())
    SCRIPTS.clear()


def _raise(exc):
    def script(prompt, n):
        raise exc

    return script


PROMPT = Prompt(id="p1", prompt="a mug")


def test_success_on_the_first_provider_records_one_attempt_and_its_price(runtime):
    image = asyncio.run(runtime.generate(PROMPT))
    assert (image.provider, image.model, image.cost_usd, image.width) == ("primary", "m1", 0.05, 64)
    assert [a.outcome for a in runtime.attempts["p1"]] == ["ok"]


def test_move_on_errors_send_the_same_attempt_down_the_chain(runtime):
    SCRIPTS["primary"] = _raise(ModelNotFound("model retired", http_status=404))
    image = asyncio.run(runtime.generate(PROMPT))
    assert image.provider == "backup"
    attempts = runtime.attempts["p1"]
    assert [(a.provider, a.outcome, a.http_status) for a in attempts] == [
        ("primary", "ModelNotFound", 404),
        ("backup", "ok", None),
    ]
    assert "primary/m1" in attempts[0].error  # the error names provider and model


def test_every_provider_declining_ends_the_prompt(runtime):
    SCRIPTS["primary"] = _raise(ModelNotFound("gone", http_status=404))
    SCRIPTS["backup"] = _raise(AuthenticationFailed("bad key", http_status=401))
    with pytest.raises(ProvidersExhausted, match="bad key") as info:
        asyncio.run(runtime.generate(PROMPT))
    assert not is_retryable(info.value)


def test_retryable_errors_are_raised_for_a_later_retry(runtime):
    SCRIPTS["primary"] = _raise(ProviderOverloaded("The model is overloaded", http_status=503))
    with pytest.raises(ProviderOverloaded) as info:
        asyncio.run(runtime.generate(PROMPT))
    assert is_retryable(info.value)
    assert [a.provider for a in runtime.attempts["p1"]] == ["primary"]


def test_corrupt_bytes_are_a_retryable_bad_image(runtime):
    SCRIPTS["primary"] = lambda p, n: b"not an image" if n == 1 else png()
    with pytest.raises(BadImage):
        asyncio.run(runtime.generate(PROMPT))
    assert asyncio.run(runtime.generate(PROMPT)).provider == "primary"
    assert [a.outcome for a in runtime.attempts["p1"]] == ["BadImage", "ok"]


def test_content_refused_gives_up_with_status_blocked(runtime):
    SCRIPTS["primary"] = _raise(ContentRefused("IMAGE_SAFETY"))
    with pytest.raises(ContentRefused) as info:
        asyncio.run(runtime.generate(PROMPT))
    assert info.value.final_status == "blocked"
    record = asyncio.run(runtime.record_failure(PROMPT, info.value))
    assert (record.status, record.provider) == ("blocked", "primary")
    assert "IMAGE_SAFETY" in record.error


def test_an_adapter_bug_is_a_non_retryable_failure_not_a_crash(runtime):
    SCRIPTS["primary"] = _raise(KeyError("candidates"))
    with pytest.raises(GiveUpError, match="unexpected KeyError") as info:
        asyncio.run(runtime.generate(PROMPT))
    assert not is_retryable(info.value)


def test_the_prompts_preferred_provider_goes_first(runtime):
    image = asyncio.run(runtime.generate(Prompt(id="p2", prompt="x", provider="backup")))
    assert image.provider == "backup"


def _records(*statuses: str) -> list[PromptRecord]:
    now = datetime.now(UTC)
    return [
        PromptRecord(id=f"p{i}", status=s, batch_id="b", finished_at=now, cost_usd=0.1)
        for i, s in enumerate(statuses)
    ]


@pytest.mark.parametrize(
    ("statuses", "outcome"),
    [
        (["succeeded"] * 9 + ["blocked"], "completed"),
        (["succeeded"] * 9 + ["failed"], "partial"),
        (["succeeded"] * 9 + ["skipped"], "partial"),
        (["succeeded"] * 8 + ["failed", "skipped"], "failed"),
    ],
)
def test_outcome_follows_the_failure_threshold(statuses, outcome):
    summary = summarize(
        "b",
        _records(*statuses),
        resumed={"p0"},
        rejected_rows=0,
        failure_threshold=0.1,
        manifest_uri="file:///m",
    )
    assert summary.outcome == outcome
    assert summary.total == 10 and summary.resumed == 1
    assert summary.cost_usd == pytest.approx(0.9)  # resumed prompts cost nothing tonight


def _judge(records: list[PromptRecord], resumed: set[str] = frozenset()):
    return summarize(
        "b",
        records,
        resumed=set(resumed),
        rejected_rows=0,
        failure_threshold=0.1,
        blocked_threshold=0.5,
        manifest_uri="file:///m",
    )


def test_a_night_that_published_nothing_or_mostly_blank_images_is_failed():
    blank = "BlankImage: the image is blank or near-uniform (1024x1024, grey-level std dev 0.0)"
    allblank = _records("blocked", "blocked", "blocked", "blocked")
    for r in allblank:
        r.error, r.error_kind = blank, "BlankImage"
    summary = _judge(allblank)
    assert summary.outcome == "failed"
    assert "every image came back blank, the provider's silent filter?" in summary.message
    # the outcome reads the kind, not the message: a refusal that mentions "blank" is a refusal
    worded = _records("blocked", "blocked")
    for r in worded:
        r.error, r.error_kind = "ContentRefused: a blank canvas was asked for", "ContentRefused"
    assert "refused every prompt" in _judge(worded).message
    refused = _judge(_records("blocked", "blocked"))
    assert refused.outcome == "failed" and "refused every prompt" in refused.message
    # more than half blocked is not a normal night, even with some images published
    mostly = _judge(_records("succeeded", "blocked", "blocked", "blocked"))
    assert mostly.outcome == "failed" and "over the blocked threshold of 50%" in mostly.message
    assert _judge(_records("succeeded", "succeeded", "blocked")).outcome == "completed"
    faulty = _records("blocked", "failed", "failed")
    faulty[0].error_kind = "BlankImage"
    for r in faulty[1:]:
        r.error_kind = "FaultyProvider"
    assert "returned blank images prompt after prompt" in _judge(faulty).message
    nothing = _judge(_records("failed", "failed", "skipped"))
    assert nothing.outcome == "failed" and "no prompt of this run succeeded" in nothing.message


def test_the_outcome_message_counts_each_prompt_once():
    done = _records("succeeded", "succeeded", "blocked")
    assert _judge(done, resumed={"p0", "p1", "p2"}).message == "3 resumed of 3 prompts"
    mixed = _records("succeeded", "succeeded", "succeeded", "succeeded", "failed", "blocked")
    mixed[3].reused_from = "night-before"
    summary = _judge(mixed, resumed={"p0", "p1"})
    assert summary.message.startswith("2 succeeded (1 reused), 1 blocked, 1 failed, 2 resumed of 6")
    assert summary.succeeded == 4  # the night's figure (its run name) counts every image it has


def test_a_rerun_with_everything_done_and_a_night_served_by_reuse_are_not_failures():
    done = _records("succeeded", "succeeded", "blocked")
    assert _judge(done, resumed={"p0", "p1", "p2"}).outcome == "completed"
    reused = _records("succeeded", "succeeded")
    for r in reused:
        r.reused_from = "night-before"
    summary = _judge(reused)
    assert summary.outcome == "completed" and summary.reused == 2
    assert _judge([]).outcome == "completed"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("examples/prompts.jsonl", "prompts-2026-11-28"),
        ("/data/Spring Sale!.csv", "Spring-Sale-2026-11-28"),
        ("gs://bucket/night/batch.yaml", "batch-2026-11-28"),
        ("...jsonl", "batch-2026-11-28"),
    ],
)
def test_default_batch_id_is_the_source_name_and_date(source, expected):
    assert default_batch_id(source, date(2026, 11, 28)) == expected


def test_provider_table_counts_outcomes_retries_and_failovers():
    from imagebatch.models import Attempt
    from imagebatch.report import provider_table

    def record(prompt_id, status, provider, *attempts, cost=0.0):
        return PromptRecord(
            id=prompt_id,
            status=status,
            provider=provider,
            attempts=[Attempt(provider=p, outcome=o, latency_s=1.0) for p, o in attempts],
            cost_usd=cost,
            batch_id="b",
            finished_at=datetime.now(UTC),
        )

    table = provider_table(
        [
            record("a", "succeeded", "primary", ("primary", "ok"), cost=0.1),
            record(
                "b",
                "succeeded",
                "backup",
                ("primary", "ProviderOverloaded"),
                ("primary", "ProviderOverloaded"),
                ("backup", "ok"),
                cost=0.05,
            ),
            record("c", "blocked", "primary", ("primary", "ContentRefused")),
        ]
    )
    rows = {r["provider"]: r for r in table}
    assert {k: rows["primary"][k] for k in ("succeeded", "blocked", "calls", "retries")} == {
        "succeeded": 1,
        "blocked": 1,
        "calls": 4,
        "retries": 2,
    }
    assert (rows["backup"]["succeeded"], rows["backup"]["failovers"]) == (1, 1)
    assert rows["primary"]["failovers"] == 0 and rows["backup"]["cost_usd"] == 0.05


def test_report_links_open_the_cloud_console_for_gcs_and_files_as_they_are():
    from imagebatch.batch import BatchSummary
    from imagebatch.report import markdown_report

    def summary(manifest: str) -> BatchSummary:
        return BatchSummary(
            batch_id="n1", total=0, manifest_uri=manifest, outcome="completed", message="ok"
        )

    gcs = markdown_report(summary("gs://shop/site/n1/manifest.jsonl"), [])
    console = "https://console.cloud.google.com/storage/browser"
    assert f"({console}/_details/shop/site/n1/manifest.jsonl)" in gcs
    assert f"Images: [gs://shop/site/n1/]({console}/shop/site/n1/)" in gcs
    local = markdown_report(summary("file:///out/n1/manifest.jsonl"), [])
    assert "(file:///out/n1/manifest.jsonl)" in local and "(file:///out/n1/)" in local


def test_signed_report_links_sign_the_manifest_once():
    """The first signature tells whether the credentials can sign; the report reuses it."""
    from imagebatch.batch import BatchSummary
    from imagebatch.report import markdown_report, report_links

    class CountingSink:
        def __init__(self) -> None:
            self.signed: list[str] = []

        def signed_url(self, uri: str, expires_s: int) -> str:
            self.signed.append(uri)
            return f"https://signed.example/{uri.removeprefix('gs://')}?expires={expires_s}"

    sink = CountingSink()
    manifest = "gs://shop/site/n1/manifest.jsonl"
    links = report_links(sink, 3600, manifest)  # type: ignore[arg-type]
    summary = BatchSummary(
        batch_id="n1", total=0, manifest_uri=manifest, outcome="completed", message="ok"
    )
    report = markdown_report(summary, [], links)
    assert "(https://signed.example/shop/site/n1/manifest.jsonl?expires=3600)" in report
    assert sink.signed == [manifest]


def test_the_report_tells_which_prompts_needed_retries_the_events_and_the_cost():
    from datetime import UTC, datetime

    from imagebatch.batch import BatchSummary
    from imagebatch.models import Attempt, PromptRecord
    from imagebatch.report import NightEvent, markdown_report

    at = datetime(2026, 12, 1, 2, 15, 7, tzinfo=UTC)

    def record(pid: str, status: str, provider: str | None, *attempts: Attempt, **kw):
        return PromptRecord(
            id=pid,
            status=status,
            provider=provider,
            attempts=list(attempts),
            batch_id="n1",
            finished_at=at,
            **kw,
        )

    ok_p = Attempt(provider="primary", outcome="ok", latency_s=40)
    ok_b = Attempt(provider="backup", outcome="ok", latency_s=20)
    busy = Attempt(provider="primary", outcome="ProviderOverloaded", http_status=503)
    odd = Attempt(
        provider="backup", outcome="ProviderServerError", http_status=500, error="a | in it"
    )
    records = [
        record("calm", "succeeded", "primary", ok_p, cost_usd=0.134),
        record("retried", "succeeded", "primary", busy, ok_p, cost_usd=0.134),
        record("moved", "succeeded", "backup", busy, busy, ok_b, cost_usd=0.04),
        record("lost", "failed", "backup", busy, odd, error="gave up | twice"),
        record("again", "succeeded", "primary", busy, ok_p, resumed=True),
    ]
    events = [
        NightEvent(at, "imagebatch.circuit.opened", "primary"),
        NightEvent(
            at.replace(minute=16), "imagebatch.provider.failover", "backup", {"from": "primary"}
        ),
    ]
    summary = BatchSummary(
        batch_id="n1",
        total=5,
        manifest_uri="file:///o/n1/manifest.jsonl",
        outcome="partial",
        message="3 of 5",
    )
    report = markdown_report(
        summary, records, events=events, task_runs={"moved": "http://ui/runs/task-run/abc"}
    )
    retried = report.split("## Prompts that needed retries or another provider")[1]
    retried = retried.split("\n## ")[0]
    rows = [x for x in retried.splitlines() if x.startswith("| `")]
    assert [x.split(" | ")[0] for x in rows] == ["| `retried`", "| `moved`", "| `lost`"]
    assert rows[1] == (
        "| `moved` | succeeded | 3 | primary → backup | primary: 503 ProviderOverloaded; "
        "primary: 503 ProviderOverloaded | [generate-moved](http://ui/runs/task-run/abc) |"
    )
    assert rows[0].endswith("| primary: 503 ProviderOverloaded |  |")  # no link known
    assert "3 prompts took more than one call" in retried  # the resumed one is not tonight's
    story = report.split("## Circuits and failovers")[1].split("\n## ")[0]
    assert "| 02:15:07 | primary | circuit opened: no calls but a probe per interval |" in story
    assert "| 02:16:07 | backup | prompts failed over to it (from: primary) |" in story
    cost = report.split("## Cost per provider")[1].split("\n## ")[0]
    assert "| primary | 2 | 6 | 4 | 0 | 40.0 | 0.2680 |" in cost  # "lost" failed, not counted
    assert "| backup | 1 | 2 | 0 | 2 | 20.0 | 0.0400 |" in cost  # "lost" ended there too
    assert "| `lost` | failed | gave up \\| twice |" in report  # a | cannot break the table

    calm = markdown_report(summary, records[:1])
    assert "## Prompts that needed retries" not in calm and "## Circuits" not in calm


def _record(pid: str, status: str = "succeeded", **kw) -> PromptRecord:
    return PromptRecord(
        id=pid, status=status, batch_id="n1", finished_at=datetime(2026, 12, 1, tzinfo=UTC), **kw
    )


def test_the_night_sheet_holds_the_first_prompts_then_every_one_that_did_not_succeed():
    from imagebatch.sheet import choose_night_cells

    records = [
        _record(f"p{i:02d}", "failed" if i in (1, 30, 33, 34) else "succeeded") for i in range(40)
    ]
    chosen, left_off = choose_night_cells(records, 24)
    assert [r.id for r in chosen] == [f"p{i:02d}" for i in range(24)] + ["p30", "p33", "p34"]
    assert left_off == 0
    chosen, left_off = choose_night_cells(records, 24, most_unsettled=2)
    assert [r.id for r in chosen][24:] == ["p30", "p33"] and left_off == 1


def test_the_night_sheet_draws_thumbnails_and_labels_what_has_no_image():
    import io

    from PIL import Image

    from imagebatch.sheet import _CAPTION_PX, _TITLE_PX, NIGHT_CELL_PX, SheetCell, night_sheet

    red = io.BytesIO()
    Image.new("RGB", (300, 200), (200, 20, 20)).save(red, format="JPEG")
    cells = [
        SheetCell("mug", "succeeded", red.getvalue()),
        SheetCell("gore", "blocked", reason="IMAGE_SAFETY: the provider refused the prompt"),
        SheetCell("odd", "succeeded", b"not an image"),
    ]
    sheet = Image.open(io.BytesIO(night_sheet(cells, title="n1: 2/3", columns=2)))
    assert sheet.size == (2 * NIGHT_CELL_PX, _TITLE_PX + 2 * (NIGHT_CELL_PX + _CAPTION_PX))

    def cell_pixel(i: int, x: int, y: int) -> tuple[int, int, int]:
        left, top = (i % 2) * NIGHT_CELL_PX, _TITLE_PX + (i // 2) * (NIGHT_CELL_PX + _CAPTION_PX)
        return sheet.getpixel((left + x, top + y))

    r, g, b = cell_pixel(0, NIGHT_CELL_PX // 2, NIGHT_CELL_PX // 2)
    assert r > 150 and g < 60 and b < 60  # the thumbnail, shrunk and centred
    assert cell_pixel(0, NIGHT_CELL_PX // 2, 10) == (255, 255, 255)  # 3:2 leaves a margin
    for i in (1, 2):  # no image: a grey cell with its reason in red
        assert cell_pixel(i, 6, NIGHT_CELL_PX - 8) == (238, 238, 238)
        reds = [
            cell_pixel(i, x, y)
            for x in range(8, NIGHT_CELL_PX - 8, 2)
            for y in range(8, 40)
            if cell_pixel(i, x, y)[0] > 120 and cell_pixel(i, x, y)[1] < 80
        ]
        assert reds, f"cell {i} says nothing"


def test_the_report_shows_the_sheet_where_it_has_a_web_address_and_links_it_otherwise():
    from imagebatch.batch import BatchSummary
    from imagebatch.report import ReportLinks, markdown_report

    summary = BatchSummary(
        batch_id="n1",
        total=1,
        manifest_uri="gs://b/n1/manifest.jsonl",
        outcome="completed",
        message="1 of 1",
    )
    records = [_record("mug")]
    plain = markdown_report(summary, records, sheet_uri="gs://b/n1/contact-sheet.png")
    sheet = plain.split("## Contact sheet")[1]
    console = "https://console.cloud.google.com/storage/browser/_details/b/n1/contact-sheet.png"
    assert f"[contact-sheet.png]({console})" in sheet and "![" not in sheet
    # the UI drops file:// links: a local sheet is named by its path, to open where it is
    local = markdown_report(summary, records, sheet_uri="file:///o/n%201/contact-sheet.png")
    assert "`/o/n 1/contact-sheet.png` on the machine that ran the batch" in local

    signed = ReportLinks(link=lambda uri: f"https://signed.example/{uri[5:]}?sig=1", signed=True)
    shown = markdown_report(summary, records, signed, sheet_uri="gs://b/n1/contact-sheet.png")
    assert "![contact sheet of n1](https://signed.example/b/n1/contact-sheet.png?sig=1)" in shown
    assert "stops showing when the link expires" in shown
    assert "## Contact sheet" not in markdown_report(summary, records)


def test_the_forms_help_texts_render_in_the_ui():
    """The Prefect UI renders field descriptions as markdown and drops what looks like a tag
    (``'<prompt file name>-<date>'`` showed as ``'-'``)."""
    from imagebatch.batch import BatchRun

    for name, field in BatchRun.model_fields.items():
        text = field.description or ""
        assert text and "<" not in text and ">" not in text, (name, text)
