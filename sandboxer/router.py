"""Which backend serves a request, and what an error means for the rest: a pure planner.

The router never calls the manager. :meth:`Router.plan` takes a profile and what the
manager tells it about each backend (its hosts, whether its SDK is installed, the
credential a create would use, its quote, the consumer's budget) and returns the
placements to try, in policy order, with every candidate it skipped and why. The manager
owns the loop: it admits and launches the placements in turn and asks
:meth:`Router.on_failure` what each error means, which is one table, :data:`FAILOVER`.

Policy ``priority`` keeps a profile's order; ``cheapest`` orders backends by quote for
the requested TTL. A backend over its cost ceiling or over the consumer's budget is
skipped; one cooling down is skipped (``RateLimited`` cools the backend down,
``AuthError`` only the refused credential, so another consumer's key, or the same
reference once its value is rotated, is tried at once). A backend that cannot keep
the profile's sandbox policy (:mod:`sandboxer.policy`) is never placed, on any fallback. The final
error lists every attempt: backend, host, error.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from sandboxer.errors import (
    AuthError,
    BackendError,
    BudgetExceeded,
    CapabilityError,
    CapacityUnavailable,
    ExtensionTimeout,
    InputError,
    MissingExtra,
    ProvisionError,
    QuotaExceeded,
    RateLimited,
    ReadinessTimeout,
    RoutingError,
    TeardownError,
)
from sandboxer.models import MeterQuote, Profile
from sandboxer.policy import describe_lacking, lacking

#: How long a credential is skipped after a backend refused it.
AUTH_COOLDOWN_S = 300.0
#: Cooldown after RateLimited without a retry_after.
RATE_LIMIT_COOLDOWN_S = 5.0


class Action(str, Enum):
    """What a failed attempt means for the rest of the plan."""

    NEXT_HOST = "next host"  # this host had no room: the next placement may
    NEXT_BACKEND = "next backend"  # the backend failed: skip its other hosts
    COOL_DOWN = "cool down"  # skip the backend (or its credential) for a while, then the next backend
    FAIL = "fail"  # another backend would not help: raise
    STOP = "stop"  # a failed attempt could not be cleaned up: never provision twice and lose one


#: The failover policy, by error class (the most specific class listed wins).
FAILOVER: dict[type[BaseException], Action] = {
    CapacityUnavailable: Action.NEXT_HOST,
    QuotaExceeded: Action.NEXT_HOST,
    RateLimited: Action.COOL_DOWN,
    AuthError: Action.COOL_DOWN,
    ReadinessTimeout: Action.NEXT_BACKEND,
    ExtensionTimeout: Action.NEXT_BACKEND,  # a hung handler: this backend, not the request
    ProvisionError: Action.NEXT_BACKEND,  # when transient; a permanent one fails
    TeardownError: Action.STOP,
    BackendError: Action.FAIL,
}


@dataclass
class Plan:
    """Placements ``(backend index, host)`` to try in order, and the candidates skipped so far."""

    placements: list[tuple[int, str | None]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    last: BaseException | None = None

    def skip(self, ext_id: str, host: str | None, exc: BaseException, why: str | None = None) -> None:
        # Not an event of its own: skips travel in the next attempt's create_intent event
        # (``route.tried_before``) or in the route_failed event, so a burst adds no writes.
        self.last = exc
        self.attempts.append({"backend": ext_id, "host": host, "error": why or str(exc), "sandbox_id": None})

    def failed(self, ext_id: str, host: str | None, exc: BaseException, sandbox_id: str | None) -> None:
        self.last = exc
        self.attempts.append({"backend": ext_id, "host": host, "error": f"{type(exc).__name__}: {exc}",
                              "sandbox_id": sandbox_id})

    def next_backend(self, pos: int) -> int:
        """The position of the first placement after ``pos`` on another backend than ``pos - 1``'s."""
        index = self.placements[pos - 1][0]
        while pos < len(self.placements) and self.placements[pos][0] == index:
            pos += 1
        return pos


class Router:
    """The planner, with the only state routing keeps: cooldowns and decision timings."""

    def __init__(self) -> None:
        #: (backend, credential key or None) -> (until, reason, the error to raise again)
        self._cooldown: dict[tuple[str, str | None], tuple[float, str, BaseException | None]] = {}
        self._lock = threading.Lock()
        #: Seconds from each create's start to its admission (ordering, quotes, budget, capacity
        #: checks and the admitting intent write), newest last: the router's own overhead.
        self.decision_times: deque[float] = deque(maxlen=10_000)

    # ------------------------------------------------------------ cooldowns

    def block(self, ext_id: str, seconds: float, reason: str, *, key: str | None = None,
              error: BaseException | None = None) -> None:
        """Skip ``ext_id`` for ``seconds``: for every request, or only those using credential ``key``
        (the backend's opaque :meth:`~SandboxExtension.credential_key`, held in memory only)."""
        with self._lock:
            self._cooldown[(ext_id, key)] = (time.monotonic() + seconds, reason, error)

    def blocked(self, ext_id: str, key: str | None = None) -> tuple[float, str, BaseException | None] | None:
        """The cooldown that applies to ``ext_id`` (for credential ``key``), if any."""
        with self._lock:
            now = time.monotonic()
            for k in ((ext_id, None), (ext_id, key)) if key is not None else ((ext_id, None),):
                entry = self._cooldown.get(k)
                if entry and entry[0] <= now:
                    del self._cooldown[k]
                elif entry:
                    return entry
            return None

    # ------------------------------------------------------------- planning

    @staticmethod
    def order(profile: Profile, quote: Callable[[int], MeterQuote]) -> list[int]:
        idx = list(range(len(profile.candidates)))
        if profile.routing == "cheapest":
            idx.sort(key=lambda i: quote(i).amount)
        return idx

    def plan(
        self,
        profile: Profile,
        ttl: float,
        *,
        hosts: Callable[[int], list[str | None]],
        missing_extra: Callable[[int], str | None],
        quote: Callable[[int], MeterQuote],
        check_budget: Callable[[MeterQuote], None] | None = None,
        credential_key: Callable[[int], str | None] = lambda i: None,
        enforces: Callable[[int], frozenset[str]] | None = None,
        why_not: Callable[[int], dict[str, str]] = lambda i: {},
        refusals: Callable[[int], list[str]] = lambda i: [],
    ) -> Plan:
        """The placements to try for ``profile``, in policy order.

        Args:
            hosts: backend index -> its hosts (``[None]`` for a backend without a pool).
            missing_extra: backend index -> why its SDK cannot be used, or None.
            quote: backend index -> its quote for ``ttl``.
            check_budget: raises BudgetExceeded if a quote is over the consumer's budget
                (None: the consumer has no budget).
            credential_key: backend index -> the credential a create would use (asked only
                while some backend is cooling down).
            enforces: backend index -> the parts of the sandbox policy it keeps; a backend
                that lacks one the profile needs is skipped, the reason in the attempts
                (None: every backend qualifies).
            why_not: backend index -> what it would enforce but its host cannot, each with why
                (for the reason in the attempts).
            refusals: backend index -> what of the profile's policy it cannot keep in
                combination (:meth:`SandboxExtension.policy_refusals`): skipped like a lack.

        Raises:
            CapabilityError: a one-backend profile's backend cannot keep its policy.
            MissingExtra: a one-backend profile's SDK is not installed.
            BudgetExceeded: every backend is over the consumer's budget (nothing was created).
        """
        plan = Plan()
        single = len(profile.candidates) == 1
        need = profile.enforcements() if enforces is not None else []
        for index in self.order(profile, quote):
            choice = profile.candidates[index]
            ext_id = choice.extension
            if need:
                lacks = lacking(need, enforces(index))  # type: ignore[misc]
                if lacks:
                    exc = CapabilityError(
                        f"{ext_id} does not enforce {describe_lacking(lacks, why_not(index))}, which the policy of profile "
                        f"{profile.slug!r} needs ({profile.network.describe()})")
                    if single:
                        raise exc
                    plan.skip(ext_id, None, exc, f"CapabilityError: {exc}")
                    continue
            refused = refusals(index)
            if refused:
                exc = CapabilityError(f"{ext_id} cannot keep the policy of profile {profile.slug!r}: "
                                      + "; ".join(refused))
                if single:
                    raise exc
                plan.skip(ext_id, None, exc, f"CapabilityError: {exc}")
                continue
            missing = missing_extra(index)
            if missing:
                if single:
                    raise MissingExtra(missing)
                plan.skip(ext_id, None, MissingExtra(missing))
                continue
            if self._cooldown:
                blocked = self.blocked(ext_id, credential_key(index))
                if blocked:
                    plan.skip(ext_id, None, self._still_blocked(ext_id, blocked))
                    continue
            if choice.cost_ceiling is not None or check_budget is not None:
                q = quote(index)
                if choice.cost_ceiling is not None and q.amount > choice.cost_ceiling:
                    plan.skip(ext_id, None, CapacityUnavailable(
                        f"quote {q.amount:.4f} {q.currency} for {ttl:g}s is over this backend's cost "
                        f"ceiling {choice.cost_ceiling:g}", backend=ext_id))
                    continue
                if check_budget is not None:
                    try:
                        check_budget(q)
                    except BudgetExceeded as exc:  # like a cost ceiling: a cheaper backend may still fit
                        plan.skip(ext_id, None, exc, f"BudgetExceeded: {exc}")
                        continue
            plan.placements.extend((index, host) for host in hosts(index))
        if not plan.placements and plan.attempts and all(
                a["error"].startswith("BudgetExceeded") for a in plan.attempts):
            raise self._with_attempts(plan.last, plan.attempts)  # type: ignore[arg-type]
        return plan

    @staticmethod
    def _still_blocked(ext_id: str, blocked: tuple[float, str, BaseException | None]) -> BaseException:
        left = blocked[0] - time.monotonic()
        if isinstance(blocked[2], AuthError):  # still the same refused key: say so, as an AuthError
            return AuthError(f"{blocked[2]} (not retried for {left:.0f}s more)", backend=ext_id,
                             credential=blocked[2].credential)
        return CapacityUnavailable(f"{ext_id} is blocked for {left:.0f}s more after: {blocked[1]}", backend=ext_id)

    # -------------------------------------------------------------- failures

    def on_failure(self, exc: BackendError, ext_id: str, credential_key: str | None = None) -> Action:
        """What ``exc`` from an attempt on ``ext_id`` means; a cooldown it calls for starts now."""
        action = next((FAILOVER[c] for c in type(exc).__mro__ if c in FAILOVER), Action.FAIL)
        if isinstance(exc, ProvisionError) and not exc.transient:
            action = Action.FAIL
        if action is Action.COOL_DOWN:
            if isinstance(exc, RateLimited):
                self.block(ext_id, exc.retry_after or RATE_LIMIT_COOLDOWN_S, f"rate limited: {exc}")
            else:
                self.block(ext_id, AUTH_COOLDOWN_S, f"credentials refused: {exc}", key=credential_key, error=exc)
        return action

    @staticmethod
    def cooldown_event(exc: BackendError) -> dict[str, Any]:
        """The detail of the ``backend_blocked`` event a COOL_DOWN records (never a secret)."""
        if isinstance(exc, RateLimited):
            return {"seconds": exc.retry_after or RATE_LIMIT_COOLDOWN_S, "reason": f"rate limited: {exc}"}
        detail: dict[str, Any] = {"seconds": AUTH_COOLDOWN_S, "reason": f"credentials refused: {exc}"}
        if isinstance(exc, AuthError) and exc.credential:
            detail["credential"] = exc.credential
        return detail

    @classmethod
    def final_error(cls, profile: Profile, plan: Plan, cause: BaseException | None = None) -> BaseException:
        """The error a create raises when no placement served it: the single backend's own error
        (or a request error) with the attempts as a note, else a RoutingError listing them."""
        last = plan.last
        if last is not None and (len(profile.candidates) == 1 or isinstance(last, InputError)):
            return cls._with_attempts(last, plan.attempts)
        err = RoutingError(f"no backend could serve profile {profile.slug!r}", plan.attempts)
        err.__cause__ = cause or last
        return err

    @staticmethod
    def stopped(profile: Profile, plan: Plan) -> RoutingError:
        return RoutingError(
            f"stopped routing profile {profile.slug!r}: a failed attempt could not be cleaned up "
            f"(gc will retry it); not trying further backends so that nothing is lost", plan.attempts,
        )

    @staticmethod
    def _with_attempts(exc: BaseException, attempts: list[dict[str, Any]]) -> BaseException:
        if len(attempts) > 1:
            exc.add_note("attempts:\n" + "\n".join(
                f"  - {a['backend']} (host {a['host'] or '-'}): {a['error']}" for a in attempts))
        return exc
