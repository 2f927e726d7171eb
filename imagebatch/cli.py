"""The ``imagebatch`` command.

The entry point is the one place in the package that reaches the orchestration layer, and it
does so lazily inside each command, so ``import imagebatch`` never imports Prefect.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from imagebatch.progress import BatchProgress, add_listener, remove_listener

if TYPE_CHECKING:
    from imagebatch.batch import BatchRun, BatchSummary

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagebatch",
        description="Publish AI-generated images in nightly batches, orchestrated by Prefect.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run one batch now",
        description="Run one batch now. Exit status: 0 completed or partially succeeded, "
        "1 failed, 2 bad input (prompt file, config, output).",
    )
    run.add_argument(
        "prompts", metavar="PROMPTS", help="prompt file: .jsonl, .csv or .yaml (path or gs://)"
    )
    _add_run_fields(run)
    run.add_argument(
        "--quiet", action="store_true", help="print only warnings, errors and the summary"
    )
    run.set_defaults(handler=_cmd_run)

    rerun = sub.add_parser(
        "rerun",
        help="run again the prompts of a batch that did not succeed",
        description="Run again, as the same batch, the prompts of a batch that did not succeed "
        "(failed and skipped; with --include-blocked also those a provider refused). Exit "
        "status as for run.",
    )
    rerun.add_argument(
        "manifest", metavar="MANIFEST", help="the batch's manifest.jsonl (path or gs://)"
    )
    rerun.add_argument("--include-blocked", action="store_true", help="retry refused prompts too")
    rerun.add_argument("--config", metavar="FILE", help="another config (default: the batch's)")
    rerun.add_argument("--quiet", action="store_true", help="no progress bar")
    rerun.set_defaults(handler=_cmd_rerun)

    serve = sub.add_parser(
        "serve",
        help="serve every deployment of prefect.yaml from this process (one machine)",
        description="Serve, in this process, every deployment that prefect.yaml defines (the "
        "nightly schedule included), so the Prefect UI at PREFECT_API_URL can run them. Stop "
        "with Ctrl-C (the schedules are paused until you serve again).",
    )
    serve.add_argument("--file", default="prefect.yaml", help="the deployments' definition")
    serve.add_argument("--limit", type=int, help="runs at once at most (default: unlimited)")
    serve.set_defaults(handler=_cmd_serve)

    auto = sub.add_parser(
        "automations",
        help="print the notification automations, ready for prefect automation create",
        description="Print automations/notifications.yaml with the id of a saved notification "
        "block filled in, ready for `prefect automation create --from-file`.",
    )
    auto.add_argument(
        "--block",
        required=True,
        metavar="TYPE/NAME",
        help="a notification block, e.g. slack-webhook/ops",
    )
    auto.add_argument("--file", default="automations/notifications.yaml", help="the template")
    auto.set_defaults(handler=_cmd_automations)

    plan = sub.add_parser(
        "plan",
        help="estimate a batch's time and cost before paying for it",
        description="Estimate, from the configured quotas, latency and prices, how long a batch "
        "will take and what it will cost. Exit status: 0 it fits, 1 it would miss its deadline, "
        "budget or daily quotas (the warnings say which), 2 bad input.",
    )
    plan.add_argument("prompts", metavar="PROMPTS", help="prompt file (path or gs://)")
    plan.add_argument("--config", metavar="FILE", help="config YAML (default: embedded, offline)")
    plan.set_defaults(handler=_cmd_plan)

    limits = sub.add_parser(
        "limits",
        help="Prefect global concurrency limits shared by every worker (shared_limits: true)",
        description="Create or update, on the Prefect server of PREFECT_API_URL, the global "
        "concurrency limits that make every worker share each provider's in-flight cap, rate "
        "and daily allowance. Run it again after changing a provider's limits.",
    )
    limits_sub = limits.add_subparsers(dest="action", required=True)
    sync = limits_sub.add_parser("sync", help="create or update the limits of a config")
    sync.add_argument("--config", metavar="FILE", help="config YAML (default: embedded)")
    sync.set_defaults(handler=_cmd_limits_sync)

    emu = sub.add_parser(
        "emulator",
        help="serve the provider emulator (every wire format, with faults)",
        description="Serve the provider emulator: the Gemini (API key and Vertex), OpenAI, "
        "Stability and Vertex endpoint wire formats on one port, with a fault profile.",
    )
    emu.add_argument("--port", type=int, default=8600, help="port (default 8600)")
    emu.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    emu.add_argument(
        "--profile", default="healthy", metavar="NAME|FILE", help="shipped profile or YAML file"
    )
    emu.set_defaults(handler=_cmd_emulator)
    return parser


#: BatchRun fields that are not ``run`` flags: the positional PROMPTS, the field a split
#: night's parent sets for its shards, and the plan (``imagebatch plan``)
_NOT_FLAGS = {"prompts", "shard", "dry_run"}
_METAVARS = {
    "config": "FILE",
    "output": "DIR_OR_URI",
    "gcs_block": "NAME",
    "batch_id": "ID",
    "budget_usd": "USD",
    "deadline_s": "S",
    "finish_by": "TIME",
}


def _add_run_fields(parser: argparse.ArgumentParser) -> None:
    """A flag per field of the nightly flow's form (:class:`imagebatch.batch.BatchRun`), with
    the form's description as its help: the CLI and the UI take the same run."""
    from imagebatch.batch import BatchRun

    for name, field in BatchRun.model_fields.items():
        if name in _NOT_FLAGS:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "").replace("%", "%%")
        kind = _scalar_type(field.annotation)
        if kind is bool:
            action = "store_true" if field.default is False else argparse.BooleanOptionalAction
            parser.add_argument(flag, action=action, default=field.default, help=help_text)
            continue
        if field.default is not None:
            help_text += f" (default {field.default})"
        parser.add_argument(
            flag,
            type=kind if kind in (int, float) else str,
            default=field.default,
            metavar=_METAVARS.get(name, "N"),
            help=help_text,
        )


def _scalar_type(annotation) -> type:
    """``int`` for ``int | None``, ``str`` for anything that is not a number or a bool."""
    import types
    import typing

    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    for candidate in (annotation, *args):
        if candidate in (bool, int, float):
            return candidate
    return str


def _run_fields(args: argparse.Namespace) -> dict:
    from imagebatch.batch import BatchRun

    return {name: getattr(args, name) for name in BatchRun.model_fields if name not in _NOT_FLAGS}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.handler(args)


def _cmd_run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from imagebatch.batch import BatchRun

    try:
        params = BatchRun(prompts=args.prompts, **_run_fields(args))
    except ValidationError as exc:
        err = exc.errors()[0]
        print(f"error: --{str(err['loc'][0]).replace('_', '-')}: {err['msg']}", file=sys.stderr)
        return EXIT_INPUT
    if params.shards > 1 and not _has_prefect_server(
        "--shards runs the night on a work pool's workers, which use the server you name"
    ):
        return EXIT_INPUT
    return _run_flow(params, quiet=args.quiet)


def _cmd_rerun(args: argparse.Namespace) -> int:
    from imagebatch.batch import rerun_params
    from imagebatch.errors import InputError

    try:
        params = rerun_params(
            args.manifest, include_blocked=args.include_blocked, config=args.config
        )
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    return _run_flow(params, quiet=args.quiet)


def _run_flow(params: BatchRun, *, quiet: bool) -> int:
    from imagebatch.errors import InputError

    if not _inputs_ok(params):  # before anything starts: a bad file costs a second, not 20
        return EXIT_INPUT
    from imagebatch.prefect.temporary_server import prepare_environment, recording_server

    prepare_environment(quiet=quiet)
    from imagebatch.flows.nightly_batch import nightly_batch

    show_bar = not quiet and sys.stderr.isatty()
    with recording_server(), _progress_bar(enabled=show_bar):
        state = asyncio.run(nightly_batch(run=params, return_state=True))
    result = state.result(raise_on_failure=False)

    if isinstance(result, BaseException):
        print(f"error: {result}", file=sys.stderr)
        return EXIT_INPUT if isinstance(result, InputError) else EXIT_FAILED
    summary: BatchSummary = result
    _print_summary(summary, state.name or "")
    return EXIT_FAILED if summary.outcome == "failed" else EXIT_OK


def _inputs_ok(params: BatchRun) -> bool:
    """Check the local config and prompt file as the flow will, printing only the clear line
    that names the file, line and key; objects in the cloud are checked by the flow."""
    from imagebatch.config import load_config
    from imagebatch.errors import InputError
    from imagebatch.prompts import load_prompts

    try:
        if params.config is None or "://" not in params.config:
            load_config(params.config)
        if "://" not in params.prompts:
            load_prompts(params.prompts, skip_bad_rows=params.skip_bad_rows)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    return True


def _cmd_serve(args: argparse.Namespace) -> int:
    from imagebatch.errors import InputError

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.file)))
    from imagebatch.flows.deployments import load_deployments

    try:
        deployments = load_deployments(args.file)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    from prefect import serve

    serve(*deployments, limit=args.limit)
    return EXIT_OK


def _cmd_automations(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        template = Path(args.file).read_text("utf-8")
    except FileNotFoundError:
        print(
            f"error: {args.file}: no such file (run this in the project directory)", file=sys.stderr
        )
        return EXIT_INPUT
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.blocks.core import Block

    try:
        block = Block.load(args.block)
    except ValueError as exc:
        print(f"error: --block {args.block}: {exc}", file=sys.stderr)
        return EXIT_INPUT
    print(template.replace("NOTIFICATION_BLOCK_ID", str(block._block_document_id)), end="")
    return EXIT_OK


def _load_inputs(config: str | None, prompts: str | None = None):
    """The config (and prompts), or None after printing what is wrong with them."""
    from imagebatch.config import load_config
    from imagebatch.errors import InputError
    from imagebatch.prompts import load_prompts

    try:
        return load_config(config), load_prompts(prompts).prompts if prompts else []
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _has_prefect_server(why: str) -> bool:
    """True when a Prefect API is configured; else print what to set (``why`` it is needed)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if os.environ.get("PREFECT_API_URL"):
        return True
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return True
    print(
        f"error: no Prefect server: {why}; "
        "set PREFECT_API_URL (or a Prefect profile) and run this again",
        file=sys.stderr,
    )
    return False


def _with_saved_blocks(config, command: str):
    """The config with its ``block:`` entries filled from the Prefect server, as a run fills them.

    None (after printing why) when a block cannot be read. Keys read from blocks are dropped:
    neither ``plan`` nor ``limits sync`` calls a provider.
    """
    from imagebatch.errors import InputError

    if not any(p.block for p in config.providers):
        return config
    if not _has_prefect_server(
        f"the config names saved blocks, and `imagebatch {command}` reads them from the Prefect "
        "server they are saved on"
    ):
        return None
    from imagebatch.blocks.providers import resolve_provider_blocks

    try:
        resolved, _keys = asyncio.run(resolve_provider_blocks(config))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return resolved


def _cmd_plan(args: argparse.Namespace) -> int:
    from imagebatch.plan import plan_batch

    inputs = _load_inputs(args.config, args.prompts)
    if inputs is None:
        return EXIT_INPUT
    config, prompts = inputs
    config = _with_saved_blocks(config, "plan")
    if config is None:
        return EXIT_INPUT
    plan = plan_batch(prompts, config)
    print(plan.describe())
    return EXIT_OK if plan.feasible else EXIT_FAILED


def _cmd_limits_sync(args: argparse.Namespace) -> int:
    from imagebatch.settings import Settings

    inputs = _load_inputs(args.config)
    if inputs is None:
        return EXIT_INPUT
    if not _has_prefect_server("shared limits live on the server your workers use"):
        return EXIT_INPUT
    config = _with_saved_blocks(inputs[0], "limits sync")
    if config is None:
        return EXIT_INPUT
    from imagebatch.prefect.limit_admin import sync_limits

    done = asyncio.run(sync_limits(config, Settings().time_scale))
    for spec, what in done:
        held = f", each held {spec.window_s:g} s" if spec.window_s else ""
        print(f"{what:9}  {spec.name}  ({spec.kind}: limit {spec.limit}{held})")
    if not done:
        print("the config has no provider limits to share")
    return EXIT_OK


def _cmd_emulator(args: argparse.Namespace) -> int:
    import uvicorn

    from imagebatch.emulator import Emulator, create_app, load_profile, named_profiles
    from imagebatch.errors import ConfigError

    try:
        profile = load_profile(args.profile)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    url = f"http://{args.host}:{args.port}"
    print(f"imagebatch emulator on {url} (time scale {profile.time_scale:g}x)")
    for i, name in enumerate(profile.providers):
        default = "  (also unprefixed)" if i == 0 else ""
        print(f"  logical provider {name}: base_url {url}/p/{name}{default}")
    print(f"  control: GET {url}/_emulator/log, POST .../_emulator/providers/NAME and .../reset")
    print(f"  shipped profiles: {', '.join(named_profiles())}")
    uvicorn.run(create_app(Emulator(profile)), host=args.host, port=args.port, log_level="warning")
    return EXIT_OK


def _print_summary(summary: BatchSummary, state_name: str) -> None:
    print(f"batch {summary.batch_id}: {state_name} ({summary.message})")
    print(
        f"  succeeded {summary.succeeded}  blocked {summary.blocked}  failed {summary.failed}  "
        f"skipped {summary.skipped}  resumed {summary.resumed}"
    )
    if summary.rejected_rows:
        print(f"  bad rows skipped: {summary.rejected_rows}")
    print(f"  cost: ${summary.cost_usd:.4f}")
    print(f"  manifest: {summary.manifest_uri}")


@contextmanager
def _progress_bar(*, enabled: bool) -> Iterator[None]:
    """A live terminal bar with counts per status and the time left, fed by the flow."""
    if not enabled:
        yield
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    task_ids: dict[str, int] = {}

    def listener(progress: BatchProgress) -> None:
        if progress.batch_id not in task_ids:
            task_ids[progress.batch_id] = bar.add_task(
                progress.batch_id, total=progress.total, status=""
            )
        counts = progress.counts
        status = " ".join(
            f"{k} {counts[k]}"
            for k in ("succeeded", "resumed", "blocked", "failed", "skipped")
            if counts[k]
        )
        bar.update(task_ids[progress.batch_id], completed=progress.done, status=status)

    add_listener(listener)
    try:
        with bar:
            yield
    finally:
        remove_listener(listener)


if __name__ == "__main__":
    sys.exit(main())
