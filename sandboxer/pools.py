"""Warm pools: sandboxes of a profile kept provisioned and ready, handed out on ``create`` (docs/pools.md).

Rules kept here:

* a pooled sandbox is an ordinary record, created through the manager's own routing and
  admission (so it counts against capacity and is metered like any other) for the consumer
  :data:`~sandboxer.models.POOL_CONSUMER`, labelled ``sandboxer.pool=<profile>``, with the
  profile's defaults alone: no consumer inputs, no consumer secrets, no name, no labels;
* only a request that such a sandbox serves exactly is served from the pool (:meth:`Pools.why_cold`);
  every other request takes the cold path, unchanged;
* a hand-out is one conditional UPDATE in the state store (:meth:`StateStore.claim_pooled`): a
  sandbox is never handed to two consumers, across threads and processes on one store; its TTL
  starts at hand-out, and a backend that ends sandboxes on its own is told (``set_ttl``);
* a pooled sandbox is provisioned for ``max_age`` plus a margin only, so the pool of a crashed
  manager is ended by the backend (or reaped by gc) soon; older than ``max_age``, or of a profile
  that no longer has a pool, it is reaped (by gc, and by the refill thread);
* the pool's upkeep tears down only sandboxes still unclaimed (:meth:`StateStore.retire_pooled`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sandboxer.contract import bound
from sandboxer.errors import BudgetExceeded, SandboxerError
from sandboxer.models import POOL_CONSUMER, Profile, SandboxCreateRequest, SandboxStatus
from sandboxer.records import short, status_of
from sandboxer.secrets import sandbox_secrets

if TYPE_CHECKING:
    from sandboxer.manager import Manager

log = logging.getLogger("sandboxer.pools")

#: The label every pooled sandbox carries, its value the profile's slug.
POOL_LABEL = "sandboxer.pool"
#: Seconds a pooled sandbox lives past its ``max_age`` at its backend (gc runs every minute or so).
POOL_MARGIN_S = 120.0
#: Claimed sandboxes that turn out dead (or whose end cannot be moved) before a create goes cold.
_HANDOUT_TRIES = 3
#: The refill thread's pace: at least this often it looks again (a hand-out wakes it at once) ...
_REFILL_EVERY_S = 5.0
#: ... and at most this long it backs off after a failed fill.
_BACKOFF_MAX_S = 60.0


@dataclass
class PoolReport:
    """What one fill (or reap, or drain) did, per profile."""

    made: dict[str, list[str]] = field(default_factory=dict)
    removed: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"made": self.made, "removed": self.removed, "errors": self.errors}


class Pools:
    """The warm pools of one manager: hand-out, fill, reap and the refill thread."""

    def __init__(self, mgr: "Manager"):
        self.mgr = mgr
        self._fill_lock = threading.Lock()  # one fill at a time in this process (thread or fill_pools)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fixed: dict[str, bool] = {}

    def profiles(self) -> list[Profile]:
        """The profiles that have a pool (``size`` over 0)."""
        return [p for p in self.mgr.catalog.profiles.values() if p.pool is not None and p.pool.size > 0]

    # ------------------------------------------------------------- hand-out

    def _ttl_fixed(self, profile: Profile) -> bool:
        """Whether some backend of ``profile`` ends sandboxes on its own at a time nothing can move."""
        fixed = self._fixed.get(profile.slug)
        if fixed is None:
            fixed = False
            for choice in profile.candidates:
                loaded = self.mgr.catalog.extensions[choice.extension]
                own = "fixed" if loaded.missing_extra else getattr(self.mgr.extension(choice.extension), "own_ttl",
                                                                   "fixed")
                fixed = fixed or own == "fixed"
            self._fixed[profile.slug] = fixed
        return fixed

    def provision_ttl(self, profile: Profile) -> float:
        """The TTL a pooled sandbox is provisioned with: ``max_age`` plus a margin; where a backend
        cannot move a sandbox's end later, plus the profile's default TTL (the most a hand-out may ask)."""
        assert profile.pool is not None
        extra = profile.ttl.default if self._ttl_fixed(profile) else 0.0
        return profile.pool.max_age + extra + POOL_MARGIN_S

    def why_cold(self, req: SandboxCreateRequest, profile: Profile, inputs: dict[str, Any], ttl: float,
                 secrets: Any) -> str | None:
        """Why this request cannot be served from ``profile``'s pool, or None if it can.

        A pooled sandbox serves a request that sets no name, no labels and no secrets of its
        own, whose inputs (if any) equal the profile's defaults, whose consumer's budget (if any)
        covers the quote of every backend of the profile for the TTL plus ``max_age``, and, on a
        backend that cannot move a sandbox's end, whose TTL is at most the profile's default.
        """
        if profile.pool is None or profile.pool.size == 0:
            return "the profile has no pool"
        if req.name:
            return "a name is asked for"
        if req.labels:
            return "labels are asked for (a pooled sandbox's backend resources carry the pool's)"
        if secrets:
            return "secrets of the request's own are given"
        if inputs != self.mgr._check_inputs(profile, {}):
            return "inputs other than the profile's defaults are given"
        if self.mgr.metering.has_budget(req.consumer):
            # what the cold path would check, on every backend the sandbox may be on, and for the
            # time it may have waited in the pool too (that is billed to the consumer)
            try:
                for i in range(len(profile.candidates)):
                    self.mgr.metering.check_budget(req.consumer,
                                                   self.mgr._quote(profile, i, ttl + profile.pool.max_age))
            except BudgetExceeded:
                return "the consumer's budget may not cover it (the cold path decides)"
        if ttl > profile.ttl.default and self._ttl_fixed(profile):
            return "a TTL over the profile's default, on a backend that cannot move a sandbox's end"
        return None

    def take(self, req: SandboxCreateRequest, profile: Profile, inputs: dict[str, Any], ttl: float,
             secrets: Any) -> SandboxStatus | None:
        """A ready sandbox from ``profile``'s pool, now the consumer's, or None (take the cold path).

        Its TTL starts now; a backend that ends sandboxes on its own is told. A claimed sandbox
        that turns out gone is marked lost, one whose end cannot be moved is torn down, and the
        next is tried (a few at most).
        """
        if profile.pool is None or self.why_cold(req, profile, inputs, ttl, secrets) is not None:
            return None
        mgr = self.mgr
        fixed = self._ttl_fixed(profile)
        try:
            for _ in range(_HANDOUT_TRIES):
                now = time.time()
                row = mgr.state.claim_pooled(
                    profile.slug, consumer=req.consumer, labels=dict(req.labels), inputs=dict(req.inputs),
                    expires_at=now + ttl, now=now, born_after=now - profile.pool.max_age,
                    lives_until=now + ttl if fixed else now)
                if row is None:
                    return None
                if self._hand_over(row, ttl):
                    return status_of(row)
            return None
        finally:
            self._wake.set()  # the refill thread makes up for what was taken

    def _hand_over(self, row: dict[str, Any], ttl: float) -> bool:
        """Check a claimed sandbox is alive and move its end; False if it cannot be handed out (then it is
        marked lost, or torn down)."""
        mgr = self.mgr
        ext = mgr.extension(row["extension"], sandbox_id=row["id"])
        what = f"hand-out of pooled sandbox {row['id']}"
        probe, settable = bound(ext, "probe", what), ext.own_ttl == "settable"
        set_ttl = bound(ext, "set_ttl", what)

        def check_and_move() -> bool:  # one call into the backend (one deadline, one thread hop)
            if probe(row["handle"]) is False:
                return False
            if settable:
                set_ttl(row["handle"], ttl)
            return True

        try:
            if not mgr._caller.call(check_and_move, timeout=mgr.limits.probe, what=what, backend=ext.id):
                mgr._refresh(row, ext)  # it is gone: marked lost (and what it left swept)
                return False
        except (SandboxerError, OSError) as exc:  # a backend error, or a TTL it refuses (E2B's plan maximum)
            log.warning("%s failed: %s; tearing it down", what, exc)
            mgr.state.record_event(row["id"], "pool_handout_failed", extension=ext.id, detail={"error": short(exc)})
            try:
                mgr._teardown(row["id"], reason="pool hand-out failed")
            except SandboxerError as texc:  # recorded teardown_failed: gc retries
                log.warning("teardown of %s failed: %s", row["id"], texc)
            return False
        return True

    # ----------------------------------------------------------------- upkeep

    def fill(self, slug: str | None = None) -> PoolReport:
        """Bring every pool (or ``slug``'s) up to its size: reap what is too old first, then create
        the missing sandboxes one by one, each through the manager's routing and admission.

        A pool that cannot be filled (a full backend, a failed create) has the error in the
        report; fill goes on with the next. Sandboxes over the size (two processes filled at once)
        are torn down, the newest first.
        """
        report = PoolReport()
        profiles = [self.mgr.profile(slug)] if slug else self.profiles()
        with self._fill_lock:
            self.reap(report)
            for profile in profiles:
                if profile.pool is None or profile.pool.size == 0:
                    continue
                try:
                    self._fill_one(profile, report)
                except SandboxerError as exc:
                    report.errors[profile.slug] = str(exc)
                    log.warning("filling the pool of %s failed: %s", profile.slug, exc)
        return report

    def _fill_one(self, profile: Profile, report: PoolReport) -> None:
        assert profile.pool is not None
        mgr = self.mgr
        inputs = mgr._check_inputs(profile, {})
        ttl = self.provision_ttl(profile)
        req = SandboxCreateRequest(profile=profile.slug, labels={POOL_LABEL: profile.slug}).model_copy(
            update={"consumer": POOL_CONSUMER})
        for _ in range(profile.pool.size):  # bounded: one create per missing sandbox at most
            if self._stop.is_set():
                return
            if mgr.state.count_live(profile=profile.slug, consumer=POOL_CONSUMER) >= profile.pool.size:
                break
            secrets = sandbox_secrets(profile.slug, profile.secrets, None)  # the operator's, resolved now
            sb = mgr._route(req, profile, inputs, ttl, secrets)
            report.made.setdefault(profile.slug, []).append(sb.id)
        ready = mgr.state.list(states=("ready",), where={"profile": profile.slug, "consumer": POOL_CONSUMER})
        for row in sorted(ready, key=lambda r: r["created_at"])[profile.pool.size:]:
            self._retire(row, "pool over its size", report)

    def reap(self, report: Any = None) -> list[str]:
        """Tear down the unclaimed pooled sandboxes older than their pool's ``max_age``, or of a
        profile that no longer has a pool. ``report`` (a PoolReport or gc's CleanupReport) gets them."""
        now = time.time()
        done: list[str] = []
        for row in self.mgr.state.list(states=("ready",), where={"consumer": POOL_CONSUMER}):
            profile = self.mgr.catalog.profiles.get(row["profile"])
            pool = profile.pool if profile is not None else None
            if pool is None or pool.size == 0:
                why = "the profile has no pool any more"
            elif row["created_at"] < now - pool.max_age:
                why = "older than the pool's max_age"
            else:
                continue
            if self._retire(row, why, report):
                done.append(row["id"])
        return done

    def drain(self, slug: str | None = None) -> PoolReport:
        """Tear down every unclaimed pooled sandbox (of ``slug``'s pool, or of all)."""
        report = PoolReport()
        where = {"consumer": POOL_CONSUMER, **({"profile": slug} if slug else {})}
        with self._fill_lock:
            for row in self.mgr.state.list(states=("ready",), where=where):
                self._retire(row, "pool drained", report)
        return report

    def _retire(self, row: dict[str, Any], why: str, report: Any) -> bool:
        mgr = self.mgr
        if row["id"] in mgr._inflight or row["extension"] not in mgr.catalog.extensions:
            return False
        cur = mgr.state.retire_pooled(row["id"], now=time.time(), reason=why)
        if cur is None:  # handed out (or ended) meanwhile
            return False
        with mgr._lock:
            mgr._tearing.add(row["id"])
        try:
            mgr._run_teardown(mgr.extension(row["extension"]), cur, False)
        except SandboxerError as exc:
            errors = report.errors if report is not None else {}
            errors[row["id"]] = str(exc)
            return False
        finally:
            with mgr._lock:
                mgr._tearing.discard(row["id"])
        if isinstance(report, PoolReport):
            report.removed.setdefault(row["profile"], []).append(row["id"])
        elif report is not None:  # gc's CleanupReport
            report.expired.append(row["id"])
        return True

    # --------------------------------------------------------- refill thread

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the refill thread (once; only when some profile has a pool)."""
        if self._thread is not None or not self.profiles():
            return
        self._thread = threading.Thread(target=self._loop, name="sandboxer-pool-refill", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        ages = [p.pool.max_age for p in self.profiles() if p.pool is not None]
        pace = max(1.0, min([_REFILL_EVERY_S, *(a / 4 for a in ages)]))
        wait = pace
        while not self._stop.is_set():
            try:
                report = self.fill()
                wait = min(wait * 2, _BACKOFF_MAX_S) if report.errors else pace
            except Exception as exc:  # noqa: BLE001 - the thread must outlive one bad round
                log.exception("pool refill failed: %s", exc)
                wait = min(wait * 2, _BACKOFF_MAX_S)
            self._wake.wait(wait)
            self._wake.clear()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the refill thread; waits for a create it is in (bounded by the profiles' ready timeouts)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is None:
            return
        if timeout is None:
            timeout = max([p.ready_timeout for p in self.profiles()] or [0.0]) + 30.0
        thread.join(timeout)
        if thread.is_alive():
            log.warning("the pool refill thread did not stop within %.0fs", timeout)
