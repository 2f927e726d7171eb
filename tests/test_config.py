from __future__ import annotations

import pytest

from imagebatch.config import default_config, load_config, parse_config
from imagebatch.errors import ConfigError
from tests.conftest import ROOT

VALID = """\
providers:
  - name: primary
    kind: local
    model: local-render-v1
    limits: {rpm: 10, rpd: 1000, max_in_flight: 16}
    price_usd: {1K: 0.134, 4K: 0.24}
    timeout_s: 120
routing: {strategy: priority, failover_after: 3, probe_interval_s: 300}
budget_usd: 50
renditions:
  - {name: original, format: png}
  - {name: thumb, format: jpeg, max_px: 256, quality: 80}
output: ./out
"""


def test_valid_config_keeps_the_chain_order_and_values(write_file):
    config = load_config(write_file("c.yaml", VALID))
    assert [p.name for p in config.providers] == ["primary"]
    primary = config.providers[0]
    assert (primary.limits.rpm, primary.limits.rpd, primary.limits.max_in_flight) == (10, 1000, 16)
    assert primary.price_for("4K") == 0.24
    assert primary.price_for("2K") == 0.24  # a missing size costs the dearest configured one
    assert config.routing.failover_after == 3
    assert [r.name for r in config.renditions] == ["original", "thumb"]


def test_embedded_default_is_offline_and_loads_without_a_file():
    config = load_config(None)
    assert config == default_config()
    assert [p.kind for p in config.providers] == ["local"]
    assert {r.format for r in config.renditions} == {"png", "webp", "jpeg"}


@pytest.mark.parametrize(
    ("text", "line", "key", "message"),
    [
        (
            VALID.replace("    timeout_s: 120", "    timeout: 120"),
            7,
            "providers[0].timeout",
            "unknown key 'timeout'",
        ),
        (VALID.replace("budget_usd: 50", "budget: 50"), 9, "budget", "unknown key 'budget'"),
        (VALID.replace("rpm: 10", "rpm: -1"), 5, "providers[0].limits.rpm", "greater than 0"),
        (VALID.replace("kind: local", "kind: dalle"), 3, "providers[0].kind", "'gemini'"),
        (VALID.replace("format: jpeg", "format: gif"), 12, "renditions[1].format", "'png'"),
        (
            VALID.replace("    timeout_s: 120", "    api_key: sk-live-123"),
            7,
            "providers[0].api_key",
            "secrets never go in the config file",
        ),
        ("providers: []\nrenditions: [{name: a, format: png}]\n", 1, "providers", "at least 1"),
        ("- a list\n", 1, None, "must be a YAML mapping"),
        ("providers: [unclosed\n", 2, None, "malformed YAML"),
    ],
)
def test_bad_config_names_file_line_and_key(write_file, text, line, key, message):
    path = write_file("bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert (err.line, err.key) == (line, key)
    assert message in str(err)
    assert str(path) in str(err)


def test_secret_values_never_appear_in_the_error(write_file):
    path = write_file("c.yaml", VALID.replace("    timeout_s: 120", "    api_key: sk-live-123"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "sk-live-123" not in str(info.value)


def test_duplicate_provider_names_are_rejected(write_file):
    text = VALID.replace("routing:", "  - {name: primary, kind: local, model: other}\nrouting:")
    with pytest.raises(ConfigError, match="duplicate name 'primary'"):
        load_config(write_file("c.yaml", text))


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"absent\.yaml: the config file does not exist"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_example_configs_are_valid(name):
    assert load_config(ROOT / "examples" / name).providers


def test_finish_by_is_checked_as_the_time_it_names():
    from datetime import UTC, datetime

    from imagebatch.batch import BatchRun
    from imagebatch.config import finish_by_time

    base = "providers: [{name: a, kind: local, model: m}]\nrenditions: [{name: o, format: png}]\n"
    with pytest.raises(
        ConfigError, match=r"line 3, key 'finish_by': .*unknown timezone 'Mars/Base'"
    ):
        parse_config(base + "finish_by: '06:00 Mars/Base'\n", source="c.yaml")
    with pytest.raises(ValueError, match="finish_by"):
        BatchRun(finish_by="soon")
    start = datetime(2026, 12, 1, 7, 30, tzinfo=UTC)
    # the next such time after the start: 06:00 in Berlin (UTC+1) has passed, so tomorrow's
    assert finish_by_time("06:00 Europe/Berlin", start).isoformat() == "2026-12-02T06:00:00+01:00"
    assert finish_by_time("09:00", start).isoformat() == "2026-12-01T09:00:00+00:00"
    assert finish_by_time("2026-12-01T08:00:00+00:00", start) > start
