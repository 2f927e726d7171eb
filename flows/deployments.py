"""Deployments, defined once in ``prefect.yaml`` and served from it by ``imagebatch serve``.

``prefect deploy --all`` reads the same file for work pools and workers, so the schedules,
timezones and parameters of the two paths cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from imagebatch.errors import ConfigError

__all__ = ["load_deployments", "read_definitions"]

#: the keys of a prefect.yaml deployment that serving understands (work_pool is for deploy)
_KNOWN = {
    "name",
    "entrypoint",
    "description",
    "tags",
    "schedules",
    "parameters",
    "enforce_parameter_schema",
    "work_pool",
    "version",
}


def read_definitions(path: str | Path = "prefect.yaml") -> list[dict[str, Any]]:
    """The ``deployments:`` entries of a prefect.yaml, checked for what serving needs."""
    source = str(path)
    try:
        spec = yaml.safe_load(Path(path).read_text("utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(
            "no prefect.yaml here: run `imagebatch serve` in the project directory, or pass "
            "--file PATH",
            source=source,
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=source) from None
    deployments = spec.get("deployments") or []
    if not deployments:
        raise ConfigError("it defines no deployments", source=source, key="deployments")
    for i, entry in enumerate(deployments):
        unknown = sorted(set(entry) - _KNOWN)
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r}", source=source, key=f"deployments[{i}]")
        for key in ("name", "entrypoint"):
            if not entry.get(key):
                raise ConfigError("missing", source=source, key=f"deployments[{i}].{key}")
    return deployments


def load_deployments(path: str | Path = "prefect.yaml") -> list:
    """Runner deployments for ``prefect.serve``, one per entry of the prefect.yaml."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron, Interval

    base = Path(path).resolve().parent
    runners = []
    for entry in read_definitions(path):
        file, _, func = entry["entrypoint"].partition(":")
        flow = load_flow_from_entrypoint(f"{base / file}:{func}")
        schedules = []
        for i, s in enumerate(entry.get("schedules") or []):
            active = s.get("active", True)
            if "cron" in s:
                schedules.append(Cron(s["cron"], timezone=s.get("timezone"), active=active))
            elif "interval" in s:
                schedules.append(Interval(s["interval"], timezone=s.get("timezone"), active=active))
            else:
                raise ConfigError(
                    "a schedule needs cron or interval",
                    source=str(path),
                    key=f"deployments[{entry['name']}].schedules[{i}]",
                )
        runners.append(
            flow.to_deployment(
                name=entry["name"],
                description=entry.get("description"),
                tags=entry.get("tags"),
                schedules=schedules,
                parameters=entry.get("parameters") or {},
                enforce_parameter_schema=entry.get("enforce_parameter_schema", True),
                version=entry.get("version"),
            )
        )
    return runners
