"""The notification automations fire: a real Prefect server, a webhook receiver on localhost.

Each automation of automations/notifications.yaml is created as a user creates it (rendered by
`imagebatch automations`, then `prefect automation create`), pointed at a custom-webhook
notification block, with its `within` shortened to Prefect's floor of 10 s.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from imagebatch.batch import BatchRun
from tests.test_deployments import create_automations

pytestmark = pytest.mark.flow


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.received.append(json.loads(body or b"{}"))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:  # quiet
        pass


def _emit(event: str, resource: dict, related: list[dict] | None = None) -> None:
    from prefect.events import emit_event

    emit_event(event=event, resource=resource, related=related or [])


def _wait_for_subjects(wanted: list[str], timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        subjects = [m.get("subject", "") for m in _Receiver.received]
        if all(any(w in s for s in subjects) for w in wanted):
            return list(_Receiver.received)
        time.sleep(0.5)
    return list(_Receiver.received)


def test_a_failed_night_a_missed_night_and_a_provider_down_reach_the_webhook(
    tmp_path, prefect_server
):
    from prefect import get_client
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from imagebatch.flows.nightly_batch import nightly_batch

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Receiver.received = []
    CustomWebhookNotificationBlock(
        name="imagebatch alerts test",
        url=f"http://127.0.0.1:{server.server_port}/hook",
        method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
    ).save("imagebatch-alerts-test", overwrite=True)
    # every `within` cut to Prefect's floor, 10 s
    create_automations(
        "custom-webhook/imagebatch-alerts-test",
        prefect_server,
        tmp_path,
        edit=lambda text: text.replace("within: 1800", "within: 10").replace(
            "within: 90000", "within: 10"
        ),
    )

    async def ours():
        async with get_client() as client:
            return [
                a for a in await client.read_automations() if a.name.startswith("imagebatch - ")
            ]

    stop = threading.Event()
    try:
        # a provider's circuit opens and never closes
        _emit(
            "imagebatch.circuit.opened", {"prefect.resource.id": "imagebatch.provider.alerts-test"}
        )

        # batches run by hand keep completing: they must not silence the missed-night alert
        def hand_run_batches() -> None:
            while not stop.wait(2):
                _emit(
                    "imagebatch.batch.completed",
                    {"prefect.resource.id": "imagebatch.batch.by-hand"},
                )

        threading.Thread(target=hand_run_batches, daemon=True).start()

        # a night that can afford nothing: every prompt skipped, nothing published -> Failed
        (tmp_path / "c.yaml").write_text(
            "providers: [{name: primary, kind: local, model: m, price_usd: {1K: 1.0}}]\n"
            "renditions: [{name: original, format: png}]\nbudget_usd: 0.5\n"
        )
        (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "a cat"}\n')
        state = asyncio.run(
            nightly_batch(
                run=BatchRun(
                    prompts=str(tmp_path / "p.jsonl"),
                    config=str(tmp_path / "c.yaml"),
                    output=str(tmp_path / "out"),
                    batch_id="alerts-night",
                ),
                return_state=True,
            )
        )
        assert state.is_failed()
        wanted = [
            "nightly batch alerts-night",
            "a provider has been down",
            "no nightly batch completed",
        ]
        received = _wait_for_subjects(wanted, timeout=120)
        subjects = [m.get("subject", "") for m in received]
        for want in wanted:
            assert any(want in s for s in subjects), (want, subjects)
        failed = next(m for m in received if "nightly batch alerts-night" in m["subject"])
        assert "is Failed" in failed["subject"] and "nothing published" in failed["body"]
    finally:
        stop.set()

        async def delete():
            async with get_client() as client:
                for automation in await ours():
                    await client.delete_automation(automation.id)

        asyncio.run(delete())
        server.shutdown()
