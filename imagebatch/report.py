"""What a finished batch tells its users: a table per provider and a markdown report."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from imagebatch.batch import BatchSummary
from imagebatch.models import PromptRecord

__all__ = ["markdown_report", "provider_table"]


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


def markdown_report(summary: BatchSummary, records: list[PromptRecord]) -> str:
    """The end-of-batch report: totals, what did not succeed and why, where the manifest is."""
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
        f"Manifest: [{summary.manifest_uri}]({console_link(summary.manifest_uri)})",
    ]
    folder = summary.manifest_uri.rsplit("/", 1)[0] + "/"
    lines.append(f"Images: [{folder}]({console_link(folder)})")
    unsettled = [r for r in records if r.status != "succeeded"]
    if unsettled:
        lines += ["", "## Prompts that did not succeed", "", "| prompt | status | reason |"]
        lines += ["|---|---|---|"]
        for r in unsettled[:200]:
            reason = (r.error or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{r.id}` | {r.status} | {reason} |")
        if len(unsettled) > 200:
            lines.append(f"| ... | | {len(unsettled) - 200} more in the manifest |")
    return "\n".join(lines) + "\n"
