"""What a finished batch tells its users: a table per provider and a markdown report."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from imagebatch.batch import BatchSummary
from imagebatch.errors import StorageError
from imagebatch.models import PromptRecord
from imagebatch.storage.base import Sink

__all__ = ["NightEvent", "ReportLinks", "markdown_report", "provider_table", "report_links"]

#: at most this many rows of prompts (failures, or signed image links) in one report
REPORT_ROWS = 200


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


@dataclass(frozen=True)
class NightEvent:
    """One thing the router told the night: a circuit opening or closing, a failover, a
    failback, a quota running out, a provider taken out of the chain; or a split night's
    shard that crashed and was started again (``provider`` then names the shard)."""

    at: datetime
    event: str  # imagebatch.circuit.opened, imagebatch.provider.failover, ...
    provider: str
    detail: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        what = {
            "imagebatch.circuit.opened": "circuit opened: no calls but a probe per interval",
            "imagebatch.circuit.closed": "circuit closed: calls go out again",
            "imagebatch.provider.failover": "prompts failed over to it",
            "imagebatch.provider.failback": "prompts came back to it",
            "imagebatch.quota.exhausted": "quota exhausted",
            "imagebatch.provider.faulty": "taken out of the chain for the night",
            "imagebatch.shard.restarted": "crashed; started again, resuming from its records",
        }.get(self.event, self.event)
        extra = ", ".join(f"{k}: {v}" for k, v in self.detail.items() if v not in (None, ""))
        return f"{what} ({extra})" if extra else what


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _attempt_error(attempt: Any) -> str:
    status = f"{attempt.http_status} " if attempt.http_status else ""
    return f"{attempt.provider}: {status}{attempt.outcome}"


def provider_table(records: list[PromptRecord]) -> list[dict[str, Any]]:
    """One row per provider: outcomes, retries, latency percentiles and cost of this run."""
    rows: dict[str, dict[str, Any]] = defaultdict(
        lambda: {
            "succeeded": 0,
            "failed": 0,
            "blocked": 0,
            "calls": 0,
            "retries": 0,
            "failovers": 0,
            "cost": 0.0,
        }
    )
    latencies: dict[str, list[float]] = defaultdict(list)
    for record in records:
        if record.resumed:
            continue
        last = len(record.attempts) - 1
        for i, attempt in enumerate(record.attempts):
            row = rows[attempt.provider]
            row["calls"] += 1
            if attempt.outcome == "ok":
                latencies[attempt.provider].append(attempt.latency_s)
            elif i < last:  # a failed call that another call followed
                row["retries"] += 1
        if record.provider and record.status != "skipped":
            row = rows[record.provider]
            row[record.status] += 1
            row["cost"] += record.cost_usd
            # it ended here after trying elsewhere: a failover to this provider
            if any(a.provider != record.provider for a in record.attempts):
                row["failovers"] += 1
    table = []
    for name, row in rows.items():
        p50, p95 = _percentile(latencies[name], 0.5), _percentile(latencies[name], 0.95)
        table.append(
            {
                "provider": name,
                "succeeded": row["succeeded"],
                "failed": row["failed"],
                "blocked": row["blocked"],
                "calls": row["calls"],
                "retries": row["retries"],
                "failovers": row["failovers"],
                "p50_latency_s": round(p50, 3) if p50 is not None else None,
                "p95_latency_s": round(p95, 3) if p95 is not None else None,
                "cost_usd": round(row["cost"], 4),
            }
        )
    return table


def console_link(uri: str) -> str:
    """Where a person opens ``uri``: the Cloud Console page of a gs:// object or folder."""
    if not uri.startswith("gs://"):
        return uri
    path = uri[len("gs://") :]
    if path.endswith("/"):
        return f"https://console.cloud.google.com/storage/browser/{path}"
    return f"https://console.cloud.google.com/storage/browser/_details/{path}"


@dataclass
class ReportLinks:
    """How the report links objects: Cloud Console pages, or signed URLs when configured."""

    link: Callable[[str], str] = field(default=console_link)
    note: str | None = None
    signed: bool = False


def report_links(
    sink: Sink, expires_s: int | None, manifest_uri: str, *, now: datetime | None = None
) -> ReportLinks:
    """Signed links when ``expires_s`` is set and the sink can sign; console links otherwise.

    A link that cannot be signed never fails the batch: the report says why and links the
    console instead.
    """
    if not expires_s:
        return ReportLinks()
    try:  # the manifest's link first: it tells whether these credentials can sign at all
        manifest_link = sink.signed_url(manifest_uri, expires_s)
    except StorageError as exc:
        return ReportLinks(note=f"Signed links were not made: {exc}. Links open the console.")
    until = (now or datetime.now(UTC)) + timedelta(seconds=expires_s)
    return ReportLinks(
        link=lambda uri: manifest_link if uri == manifest_uri else sink.signed_url(uri, expires_s),
        note=f"Links are signed URLs valid until {until:%Y-%m-%d %H:%M} UTC: anyone holding "
        "one can download the object until then, so share the report accordingly.",
        signed=True,
    )


def markdown_report(
    summary: BatchSummary,
    records: list[PromptRecord],
    links: ReportLinks | None = None,
    *,
    events: Sequence[NightEvent] = (),
    task_runs: Mapping[str, str] | None = None,
    sheet_uri: str | None = None,
) -> str:
    """The end-of-batch report: totals, cost per provider, the prompts that needed retries or
    another provider (with a link to each one's generate task run, from ``task_runs``: prompt
    id -> URL), the circuit and failover ``events`` with their times, what did not succeed and
    why, where the manifest is, and the night's contact sheet (``sheet_uri``): shown in the
    report where its link is a http(s) URL (signed: it stops showing when the link expires),
    linked otherwise."""
    links = links or ReportLinks()
    task_runs = task_runs or {}
    lines = [
        f"# Batch `{summary.batch_id}`: {summary.outcome}",
        "",
        summary.message + ".",
        "",
        "| succeeded | blocked | failed | skipped | resumed | rejected rows | cost (USD) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {summary.succeeded} | {summary.blocked} | {summary.failed} | {summary.skipped} "
        f"| {summary.resumed} | {summary.rejected_rows} | {summary.cost_usd:.4f} |",
        "",
        f"Manifest: [{summary.manifest_uri}]({links.link(summary.manifest_uri)})",
    ]
    folder = summary.manifest_uri.rsplit("/", 1)[0] + "/"
    lines += ["", f"Images: [{folder}]({console_link(folder)})"]
    if links.note:
        lines += ["", links.note]
    table = provider_table(records)
    if table:
        lines += [
            "",
            "## Cost per provider",
            "",
            "| provider | images | calls | retries | failovers | p50 latency (s) | cost (USD) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in table:
            p50 = "" if row["p50_latency_s"] is None else f"{row['p50_latency_s']:.1f}"
            lines.append(
                f"| {row['provider']} | {row['succeeded']} | {row['calls']} | {row['retries']} "
                f"| {row['failovers']} | {p50} | {row['cost_usd']:.4f} |"
            )
    eventful = [r for r in records if not r.resumed and len(r.attempts) > 1]
    if eventful:
        lines += [
            "",
            "## Prompts that needed retries or another provider",
            "",
            f"{len(eventful)} prompts took more than one call. Errors are in the order they came.",
            "",
            "| prompt | status | calls | providers | errors | task run |",
            "|---|---|---:|---|---|---|",
        ]
        for r in eventful[:REPORT_ROWS]:
            path: list[str] = []
            for attempt in r.attempts:
                if not path or path[-1] != attempt.provider:
                    path.append(attempt.provider)
            errors = "; ".join(_attempt_error(a) for a in r.attempts if a.outcome != "ok")
            run = f"[generate-{r.id}]({task_runs[r.id]})" if r.id in task_runs else ""
            lines.append(
                f"| `{r.id}` | {r.status} | {len(r.attempts)} | {' → '.join(path)} "
                f"| {_cell(errors)} | {run} |"
            )
        if len(eventful) > REPORT_ROWS:
            lines.append(f"| ... | | | | {len(eventful) - REPORT_ROWS} more in the manifest | |")
    if events:
        lines += [
            "",
            "## Circuits and failovers",
            "",
            "| time (UTC) | provider | what happened |",
            "|---|---|---|",
        ]
        for e in list(events)[:REPORT_ROWS]:
            at = e.at.astimezone(UTC).strftime("%H:%M:%S")
            lines.append(f"| {at} | {e.provider} | {_cell(e.describe())} |")
        if len(events) > REPORT_ROWS:
            lines.append(f"| ... | | {len(events) - REPORT_ROWS} more in the run's events |")
    unsettled = [r for r in records if r.status != "succeeded"]
    if unsettled:
        lines += ["", "## Prompts that did not succeed", "", "| prompt | status | reason |"]
        lines += ["|---|---|---|"]
        for r in unsettled[:REPORT_ROWS]:
            lines.append(f"| `{r.id}` | {r.status} | {_cell(r.error or '')} |")
        if len(unsettled) > REPORT_ROWS:
            lines.append(f"| ... | | {len(unsettled) - REPORT_ROWS} more in the manifest |")
    if sheet_uri:
        lines += ["", "## Contact sheet", ""]
        link = links.link(sheet_uri) if links.signed else console_link(sheet_uri)
        if link.startswith(("https://", "http://")) and (links.signed or sheet_uri == link):
            lines.append(f"![contact sheet of {summary.batch_id}]({link})")
            if links.signed:
                lines += [
                    "",
                    "The sheet is shown through a signed URL: it stops showing when "
                    "the link expires.",
                ]
        elif sheet_uri.startswith("file://"):  # a browser will not open a local file from a page
            lines.append(
                f"`{url2pathname(urlsplit(sheet_uri).path)}` on the machine that ran the batch: "
                "thumbnails of the first prompts and a labelled cell for every prompt that did "
                "not succeed. (Publish to gs:// with `signed_url_expiry_s` to see it here.)"
            )
        else:
            lines.append(
                f"[{sheet_uri.rsplit('/', 1)[-1]}]({link}): thumbnails of the first "
                "prompts and a labelled cell for every prompt that did not succeed."
            )
    published = [r for r in records if r.status == "succeeded" and r.objects]
    if links.signed and published:
        lines += ["", "## Images", "", "| prompt | renditions |", "|---|---|"]
        for r in published[:REPORT_ROWS]:
            cells = ", ".join(f"[{o.rendition}]({links.link(o.uri)})" for o in r.objects)
            lines.append(f"| `{r.id}` | {cells} |")
        if len(published) > REPORT_ROWS:
            lines.append(f"| ... | {len(published) - REPORT_ROWS} more in the manifest |")
    return "\n".join(lines) + "\n"
