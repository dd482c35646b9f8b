"""Which backend serves a request, and what happens when it can't.

Policy ``priority`` tries a profile's backends in order; ``cheapest`` orders
them by quote for the requested TTL. Admission is atomic (the state store
counts live sandboxes and inserts the intent in one locked transaction).

Fallback rules: capacity and quota errors try the next host, then the next
backend; ``RateLimited`` blocks that backend for a cooldown, ``AuthError``
blocks that backend *for the refused credential only* (another consumer's key,
or the same reference once its value is rotated, is tried at once); a backend
over its cost ceiling or over the consumer's budget is skipped; transient
provision failures and readiness timeouts fall through to the next backend;
request errors stop at once; a failed attempt that could not be cleaned up
stops everything (never provision twice and lose one). The final error lists
every attempt: backend, host, error.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any

from sandboxer.errors import (
    AuthError,
    BackendError,
    BudgetExceeded,
    InputError,
    CapacityUnavailable,
    MissingExtra,
    ProvisionError,
    QuotaExceeded,
    RateLimited,
    ReadinessTimeout,
    RoutingError,
    TeardownError,
)
from sandboxer.models import Profile, SandboxCreateRequest, SandboxStatus
from sandboxer.state import OverCapacity

if TYPE_CHECKING:
    from sandboxer.manager import Manager

#: How long a backend is skipped after it refused our credentials.
AUTH_COOLDOWN_S = 300.0
#: Cooldown after RateLimited without a retry_after.
RATE_LIMIT_COOLDOWN_S = 5.0


class Router:
    def __init__(self, manager: "Manager"):
        self.manager = manager
        #: (backend, credential key or None) -> (until, reason, the error to raise again)
        self._cooldown: dict[tuple[str, str | None], tuple[float, str, BaseException | None]] = {}
        self._lock = threading.Lock()
        #: Seconds from each route() call to its admission (ordering, quotes, budget, capacity
        #: checks and the admitting intent write), newest last: the router's own overhead.
        self.decision_times: deque[float] = deque(maxlen=10_000)

    # ------------------------------------------------------------ cooldowns

    def block(self, ext_id: str, seconds: float, reason: str, *, credential: str | None = None,
              key: str | None = None, error: BaseException | None = None) -> None:
        """Skip ``ext_id`` for ``seconds``: for every request, or only those using credential ``key``.

        ``key`` is the backend's opaque :meth:`~SandboxExtension.credential_key` (held in memory
        only); ``credential`` is its reference, for the event.
        """
        until = time.monotonic() + seconds
        with self._lock:
            self._cooldown[(ext_id, key)] = (until, reason, error)
        detail: dict[str, Any] = {"seconds": seconds, "reason": reason}
        if credential:
            detail["credential"] = credential
        self.manager.state.record_event(None, "backend_blocked", extension=ext_id, detail=detail)

    def blocked(self, ext_id: str, key: str | None = None) -> tuple[float, str, BaseException | None] | None:
        """The cooldown that applies to ``ext_id`` (for credential ``key``), if any."""
        if not self._cooldown:
            return None
        with self._lock:
            now = time.monotonic()
            for k in ((ext_id, None), (ext_id, key)) if key is not None else ((ext_id, None),):
                entry = self._cooldown.get(k)
                if entry and entry[0] <= now:
                    del self._cooldown[k]
                elif entry:
                    return entry
            return None

    # ------------------------------------------------------------- limits

    def limits(self, profile: Profile, index: int, host: str | None) -> list[tuple[str, int, dict[str, Any]]]:
        choice = profile.candidates[index]
        out: list[tuple[str, int, dict[str, Any]]] = []
        if choice.capacity is not None:
            out.append((choice.extension, choice.capacity, {"extension": choice.extension}))
        if host is not None:
            per_host = choice.capacity_per_host
            if per_host is None:
                per_host = self.manager.extension(choice.extension).hosts().get(host)
            if per_host is not None:
                out.append((f"{choice.extension} host {host}", per_host, {"extension": choice.extension, "host": host}))
        return out

    def _hosts(self, profile: Profile, index: int) -> list[str | None]:
        choice = profile.candidates[index]
        hosts = list(choice.hosts) or list(self.manager.extension(choice.extension).hosts())
        return hosts or [None]

    # -------------------------------------------------------------- route

    def order(self, profile: Profile, ttl: float) -> list[int]:
        idx = list(range(len(profile.candidates)))
        if profile.routing == "cheapest":
            idx.sort(key=lambda i: self.manager.metering.quote(profile, i, ttl).amount)
        return idx

    def route(self, req: SandboxCreateRequest, profile: Profile, inputs: dict[str, Any], ttl: float) -> SandboxStatus:
        """Create on the first backend (in policy order) that can take it.

        Raises:
            RequestError subclasses at once; the single backend's own error for a
            one-backend profile; RoutingError listing every attempt otherwise.
        """
        started = time.perf_counter()
        return self._route(req, profile, inputs, ttl,
                           lambda: self.decision_times.append(time.perf_counter() - started))

    def _route(self, req: SandboxCreateRequest, profile: Profile, inputs: dict[str, Any], ttl: float,
               on_admitted: Any) -> SandboxStatus:
        mgr = self.manager
        attempts: list[dict[str, Any]] = []
        last: BaseException | None = None
        single = len(profile.candidates) == 1
        placements: list[tuple[int, str | None]] = []
        for index in self.order(profile, ttl):
            choice = profile.candidates[index]
            ext_id = choice.extension
            loaded = mgr.catalog.extensions[ext_id]
            if loaded.missing_extra:
                if single:
                    raise MissingExtra(loaded.missing_extra)
                last = MissingExtra(loaded.missing_extra)
                self._skip(attempts, ext_id, None, loaded.missing_extra)
                continue
            blocked = self.blocked(ext_id, self._credential_key(ext_id, req.consumer)) if self._cooldown else None
            if blocked:
                left = blocked[0] - time.monotonic()
                if isinstance(blocked[2], AuthError):  # still the same refused key: say so, as an AuthError
                    last = AuthError(f"{blocked[2]} (not retried for {left:.0f}s more)", backend=ext_id,
                                     credential=blocked[2].credential)
                else:
                    last = CapacityUnavailable(f"{ext_id} is blocked for {left:.0f}s more after: {blocked[1]}",
                                               backend=ext_id)
                self._skip(attempts, ext_id, None, str(last))
                continue
            if choice.cost_ceiling is not None or mgr.metering.has_budget(req.consumer):
                quote = mgr.metering.quote(profile, index, ttl)
                if choice.cost_ceiling is not None and quote.amount > choice.cost_ceiling:
                    last = CapacityUnavailable(
                        f"quote {quote.amount:.4f} {quote.currency} for {ttl:g}s is over this backend's cost "
                        f"ceiling {choice.cost_ceiling:g}", backend=ext_id)
                    self._skip(attempts, ext_id, None, str(last))
                    continue
                try:
                    mgr.metering.check_budget(req.consumer, quote)
                except BudgetExceeded as exc:  # like a cost ceiling: a cheaper backend may still fit
                    last = exc
                    self._skip(attempts, ext_id, None, f"BudgetExceeded: {exc}")
                    continue
            placements.extend((index, host) for host in self._hosts(profile, index))
        if not placements and attempts and all(a["error"].startswith("BudgetExceeded") for a in attempts):
            raise self._with_attempts(last, attempts)  # type: ignore[arg-type]

        pos = 0
        while pos < len(placements):
            sandbox_id = "sb-" + uuid.uuid4().hex[:12]
            row: dict[str, Any] = {}
            try:
                chosen, refused, row = mgr.admit(
                    sandbox_id=sandbox_id, profile=profile, placements=placements[pos:], ttl=ttl,
                    consumer=req.consumer, labels=req.labels, name=req.name,
                    detail={"route": {"policy": profile.routing, "tried_before": list(attempts)}},
                    inputs=inputs, given=req.inputs,
                )
            except OverCapacity as exc:
                refused, chosen = exc.refusals, None
                for p, scope, taken, holder in exc.clashes:
                    index, host = placements[pos + p]
                    last = InputError(f"{taken!r} is already used on {scope.replace('@', ' host ')} by live "
                                      f"sandbox {holder}; choose another (or tear {holder} down first)")
                    self._skip(attempts, profile.candidates[index].extension, host, str(last))
            for p, scope, limit in refused:
                index, host = placements[pos + p]
                last = CapacityUnavailable(f"{scope} is full ({limit} live sandboxes)",
                                           backend=profile.candidates[index].extension, host=host)
                self._skip(attempts, last.backend or "", host, str(last))
            if chosen is None:
                break
            on_admitted()
            index, host = placements[pos + chosen]
            ext_id = profile.candidates[index].extension
            pos += chosen + 1
            try:
                return mgr.launch(sandbox_id=sandbox_id, profile=profile, index=index, host=host, inputs=inputs,
                                  ttl=ttl, consumer=req.consumer, labels=req.labels, row=row)
            except (CapacityUnavailable, QuotaExceeded) as exc:
                last = exc
                attempts.append(self._attempt(ext_id, host, exc, sandbox_id))
            except (RateLimited, AuthError) as exc:
                last = exc
                attempts.append(self._attempt(ext_id, host, exc, sandbox_id))
                if isinstance(exc, RateLimited):
                    self.block(ext_id, exc.retry_after or RATE_LIMIT_COOLDOWN_S, f"rate limited: {exc}")
                else:
                    self.block(ext_id, AUTH_COOLDOWN_S, f"credentials refused: {exc}", credential=exc.credential,
                               key=self._credential_key(ext_id, req.consumer), error=exc)
                pos = self._next_backend(placements, pos, index)
            except TeardownError as exc:
                attempts.append(self._attempt(ext_id, host, exc, sandbox_id))
                raise RoutingError(
                    f"stopped routing profile {profile.slug!r}: a failed attempt could not be cleaned up "
                    f"(gc will retry it); not trying further backends so that nothing is lost", attempts,
                ) from exc
            except (ProvisionError, ReadinessTimeout) as exc:
                last = exc
                attempts.append(self._attempt(ext_id, host, exc, sandbox_id))
                if isinstance(exc, ProvisionError) and not exc.transient:
                    return self._fail(profile, attempts, exc, single)
                pos = self._next_backend(placements, pos, index)
            except BackendError as exc:
                attempts.append(self._attempt(ext_id, host, exc, sandbox_id))
                return self._fail(profile, attempts, exc, single)
        return self._fail(profile, attempts, last, single)

    def _credential_key(self, ext_id: str, consumer: str) -> str | None:
        try:
            return self.manager.extension(ext_id).credential_key(consumer)
        except Exception:  # noqa: BLE001 - no key to tell apart: the cooldown then covers the backend
            return None

    @staticmethod
    def _with_attempts(exc: BaseException, attempts: list[dict[str, Any]]) -> BaseException:
        if len(attempts) > 1:
            exc.add_note("attempts:\n" + "\n".join(
                f"  - {a['backend']} (host {a['host'] or '-'}): {a['error']}" for a in attempts))
        return exc

    @staticmethod
    def _next_backend(placements: list[tuple[int, str | None]], pos: int, index: int) -> int:
        """Skip the remaining hosts of backend ``index``: the error was about the backend, not the host."""
        while pos < len(placements) and placements[pos][0] == index:
            pos += 1
        return pos

    @staticmethod
    def _attempt(ext_id: str, host: str | None, exc: BaseException, sandbox_id: str | None = None) -> dict[str, Any]:
        return {"backend": ext_id, "host": host, "error": f"{type(exc).__name__}: {exc}", "sandbox_id": sandbox_id}

    @staticmethod
    def _skip(attempts: list[dict[str, Any]], ext_id: str, host: str | None, why: str) -> None:
        # Not an event of its own: skips travel in the next attempt's create_intent event
        # (``route.tried_before``) or in the route_failed event, so a burst adds no writes.
        attempts.append({"backend": ext_id, "host": host, "error": why, "sandbox_id": None})

    def _fail(self, profile: Profile, attempts: list[dict[str, Any]], last: BaseException | None, single: bool):
        self.manager.state.record_event(None, "route_failed", detail={"profile": profile.slug, "attempts": attempts})
        if single and last is not None or isinstance(last, InputError):
            raise self._with_attempts(last, attempts)
        raise RoutingError(f"no backend could serve profile {profile.slug!r}", attempts) from last
