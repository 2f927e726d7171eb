"""What a finished batch tells its users: a table per provider and a markdown report."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from imagebatch.batch import BatchSummary
from imagebatch.errors import StorageError
from imagebatch.models import PromptRecord
from imagebatch.storage.base import Sink

__all__ = ["ReportLinks", "markdown_report", "provider_table", "report_links"]

#: at most this many rows of prompts (failures, or signed image links) in one report
REPORT_ROWS = 200


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


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
    summary: BatchSummary, records: list[PromptRecord], links: ReportLinks | None = None
) -> str:
    """The end-of-batch report: totals, what did not succeed and why, where the manifest is."""
    links = links or ReportLinks()
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
    lines.append(f"Images: [{folder}]({console_link(folder)})")
    if links.note:
        lines += ["", links.note]
    unsettled = [r for r in records if r.status != "succeeded"]
    if unsettled:
        lines += ["", "## Prompts that did not succeed", "", "| prompt | status | reason |"]
        lines += ["|---|---|---|"]
        for r in unsettled[:REPORT_ROWS]:
            reason = (r.error or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{r.id}` | {r.status} | {reason} |")
        if len(unsettled) > REPORT_ROWS:
            lines.append(f"| ... | | {len(unsettled) - REPORT_ROWS} more in the manifest |")
    published = [r for r in records if r.status == "succeeded" and r.objects]
    if links.signed and published:
        lines += ["", "## Images", "", "| prompt | renditions |", "|---|---|"]
        for r in published[:REPORT_ROWS]:
            cells = ", ".join(f"[{o.rendition}]({links.link(o.uri)})" for o in r.objects)
            lines.append(f"| `{r.id}` | {cells} |")
        if len(published) > REPORT_ROWS:
            lines.append(f"| ... | {len(published) - REPORT_ROWS} more in the manifest |")
    return "\n".join(lines) + "\n"
