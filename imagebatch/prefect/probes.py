"""One probe per interval among all workers for a provider whose circuit is open.

The limit ``imagebatch-<provider>-probe`` has one slot. The worker that probes takes it and
holds it until one interval after its probe *left* (its lease frees it if the process dies
first), so all workers together send one probe per interval. A probe given up before it left
gives the slot back at once; the prober's own next probe takes its slot anew. Created on first
use (nothing to sync).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from imagebatch.prefect.server import ServerLink, refused

__all__ = ["ProbeSlots"]

log = logging.getLogger("imagebatch.limits")


class ProbeSlots:
    def __init__(self, link: ServerLink, names: dict[str, str]) -> None:
        self._link = link
        self._names = names  # provider -> its probe limit
        self._known: set[str] = set()
        # this worker's claims: lease id and interval, and the timer that gives each back
        self._held: dict[str, tuple[str, float]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    async def claim(self, provider: str, interval_s: float) -> bool:
        """Take the provider's probe slot, or say another worker holds it. A slot this worker
        still holds from its last probe is taken anew. A server that cannot be asked lets the
        probe go: a probe too many is better than a provider never probed."""
        name = self._names.get(provider)
        if name is None:
            return True
        client = await self._link.client()
        if provider in self._held:  # our own last probe's interval: ours to end
            timer = self._timers.pop(provider, None)
            if timer is not None:
                timer.cancel()
            lease_id, _ = self._held.pop(provider)
            await self._link.release(lease_id)
        try:
            if name not in self._known:
                try:
                    await client.read_global_concurrency_limit_by_name(name)
                except ObjectNotFound:
                    with contextlib.suppress(ObjectAlreadyExists):
                        await client.create_global_concurrency_limit(
                            GlobalConcurrencyLimitCreate(name=name, limit=1)
                        )
                self._known.add(name)
            response = await client.increment_concurrency_slots_with_lease(
                [name], slots=1, mode="concurrency", lease_duration=max(60.0, interval_s + 15.0)
            )
        except Exception as exc:
            if refused(exc):
                return False
            log.warning("could not ask for %s's probe slot, probing anyway: %s", provider, exc)
            return True
        lease_id = response.json().get("lease_id")
        if lease_id is not None:
            self._held[provider] = (lease_id, interval_s)
        return True

    def ended(self, provider: str, sent_ago: float | None) -> None:
        """Hold the probe slot until one interval after the probe left (then give it back), or
        give it back now if the probe never left."""
        if provider not in self._held or not self._link.open:
            return
        lease_id, interval_s = self._held[provider]
        keep = 0.0 if sent_ago is None else interval_s - sent_ago
        if keep <= 0:
            del self._held[provider]
            self._link.spawn(self._link.release(lease_id))
            return

        def give_back() -> None:
            if self._held.get(provider, (None,))[0] == lease_id:
                del self._held[provider]
                self._timers.pop(provider, None)
                self._link.spawn(self._link.release(lease_id))

        self._timers[provider] = asyncio.get_running_loop().call_later(keep, give_back)
        # the lease outlives the hold (the probe waited at the gate and ran since it was taken)
        self._link.spawn(self._renew(lease_id, keep))

    async def _renew(self, lease_id: str, keep: float) -> None:
        try:
            client = await self._link.client()
            await client.renew_concurrency_lease(lease_id, lease_duration=max(60.0, keep + 15.0))
        except Exception as exc:  # its first lease may still cover the interval
            log.warning("could not renew the probe slot's lease: %s", exc)

    def leave(self) -> None:
        """A held slot's interval is left to its lease."""
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
