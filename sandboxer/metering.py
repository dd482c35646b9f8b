"""Quotes, usage records, budgets and export sinks.

Rules kept here: a quote is priced from the manifest's ``pricing`` (metered
backends per resource-second, self-hosted ones at their amortised rate or
zero); every sandbox's usage interval is recorded in the state store (start,
stop, resources, price); an interval the orchestrator could not close is
closed at the last time the sandbox was seen alive; each exported record has
a stable id and goes through an outbox, so a push that fails is retried, never
lost, and exporting again never duplicates. It holds the state store, never the
manager, and runs no SQL of its own (state.py has it all). A webhook's secret headers are
references resolved at delivery: never in the exports table, a log line or an
error.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sandboxer.errors import AuthError, BudgetExceeded, ConfigError
from sandboxer.models import ExtensionManifest, MeterQuote, Pricing, Profile, Settings, SinkConfig
if TYPE_CHECKING:  # the store (SQLAlchemy) loads only where a manager opens one
    from sandboxer.state import StateStore

log = logging.getLogger("sandboxer.metering")

RECORD_FIELDS = ["id", "sandbox_id", "period", "consumer", "profile", "extension", "start", "end", "seconds",
                 "cpu", "memory_mb", "amount", "currency"]


def price(manifest: ExtensionManifest, profile: Profile, seconds: float, *, kind: str = "estimate") -> MeterQuote:
    """Price ``seconds`` of ``profile`` from ``manifest.pricing``."""
    p = manifest.pricing or Pricing()
    res = profile.resources
    parts = {
        "base": p.per_second * seconds,
        "cpu": p.per_vcpu_second * res.cpu * seconds,
        "memory": p.per_gib_second * (res.memory_mb / 1024) * seconds,
    }
    return MeterQuote(
        extension=manifest.id, profile=profile.slug, duration_s=seconds, amount=round(math.fsum(parts.values()), 6),
        currency=p.currency, pricing_model=manifest.capabilities.pricing_model, kind=kind,  # type: ignore[arg-type]
        breakdown={k: round(v, 6) for k, v in parts.items() if v}, source=p.source,
    )


def _rate(price_row: dict[str, Any] | None, resources: dict[str, Any] | None) -> float:
    """Cost per second from a stored pricing dump and resources dump."""
    p = price_row or {}
    r = resources or {}
    return (p.get("per_second", 0.0) + p.get("per_vcpu_second", 0.0) * r.get("cpu", 1.0)
            + p.get("per_gib_second", 0.0) * r.get("memory_mb", 512) / 1024)


def _period_start(ts: float, period: str) -> float:
    d = datetime.fromtimestamp(ts, tz=timezone.utc)
    d = d.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        d = d.replace(day=1)
    return d.timestamp()


class Metering:
    """Usage intervals, budgets, reports and export, over the state store's API.

    Args:
        state: the state store (all SQL is there).
        settings: budgets and sinks, or a callable that returns them when first needed (a lazy
            manager's catalog loads only then).
        pricing: extension id -> its manifest's pricing (None: free).
    """

    def __init__(self, state: StateStore, settings: "Settings | Callable[[], Settings]",
                 pricing: Callable[[str], Pricing | None]):
        self._state = state
        self._settings = settings
        self._pricing = pricing

    @property
    def settings(self) -> Settings:
        if callable(self._settings):
            self._settings = self._settings()
        return self._settings

    # --------------------------------------------------------------- actuals

    def started(self, conn: Any, row: dict[str, Any]) -> None:
        """Open the usage interval of a sandbox that just became ready (inside its transition)."""
        pricing = self._pricing(row["extension"]) or Pricing()
        self._state.open_usage(conn, row, pricing.model_dump(), pricing.currency)

    def stopped(self, conn: Any, sandbox_id: str, ts: float, reported: dict[str, Any] | None = None) -> None:
        """Close a usage interval, priced from the recorded rate or refined by the backend's own figures.

        ``reported`` (from ``meter_actual``) may carry ``cost`` (the provider's amount) or
        ``rate_per_second`` (the provider's rate for this sandbox's real size).
        """
        def amount(u: dict[str, Any], stop: float) -> float:
            rate = _rate(u["price"], u["resources"])
            if reported and isinstance(reported.get("rate_per_second"), (int, float)):
                rate = float(reported["rate_per_second"])
            if reported and isinstance(reported.get("cost"), (int, float)):
                return float(reported["cost"])
            return rate * (stop - u["started_at"])

        self._state.close_usage(conn, sandbox_id, ts, amount, reported)

    def close_abandoned(self) -> None:
        """Close intervals of sandboxes that ended while nobody was watching."""
        self._state.close_abandoned_usage(lambda u, stop: _rate(u["price"], u["resources"]) * (stop - u["started_at"]))

    def _usage(self, since: float | None = None) -> list[dict[str, Any]]:
        return self._state.usage(since)

    def spent(self, consumer: str, since: float, now: float | None = None) -> float:
        """Spend of ``consumer`` since ``since``: closed intervals plus live ones to their expiry."""
        now = now or time.time()
        total = 0.0
        expires = {r["id"]: r["expires_at"] for r in self._state.list(where={"consumer": consumer})}
        for u in self._usage(since):
            if u["consumer"] != consumer:
                continue
            start = max(u["started_at"], since)
            end = u["stopped_at"] if u["stopped_at"] is not None else max(expires.get(u["sandbox_id"], now), now)
            total += _rate(u["price"], u["resources"]) * max(0.0, end - start)
        return total

    def has_budget(self, consumer: str) -> bool:
        budgets = self.settings.budgets
        return consumer in budgets or "*" in budgets

    def check_budget(self, consumer: str, quote: MeterQuote) -> None:
        """Refuse a create whose quote would take ``consumer`` over its budget.

        Raises:
            BudgetExceeded: before anything is provisioned.
        """
        budgets = self.settings.budgets
        budget = budgets.get(consumer) or budgets.get("*")
        if budget is None or quote.amount == 0:
            return
        since = _period_start(time.time(), budget.period)
        spent = self.spent(consumer, since)
        if spent + quote.amount > budget.limit:
            raise BudgetExceeded(
                f"consumer {consumer!r} has a budget of {budget.limit:g} {quote.currency} per {budget.period}; "
                f"{spent:.4f} is spent or committed and this sandbox is quoted at {quote.amount:.4f} on "
                f"{quote.extension} — refused, nothing was provisioned"
            )

    # --------------------------------------------------------------- reports

    def records(self, since: float | None = None) -> list[dict[str, Any]]:
        """Usage records, one per closed sandbox interval per UTC day, with stable ids."""
        out: list[dict[str, Any]] = []
        for u in sorted(self._usage(since), key=lambda r: (r["started_at"], r["sandbox_id"])):
            if u["stopped_at"] is None:
                continue
            rate = _rate(u["price"], u["resources"])
            start = u["started_at"]
            while start < u["stopped_at"] or start == u["started_at"]:
                day = datetime.fromtimestamp(start, tz=timezone.utc).date()
                day_end = datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=timezone.utc).timestamp()
                end = min(u["stopped_at"], day_end)
                secs = max(0.0, end - start)
                if since is None or end >= since:
                    out.append({
                        "id": f"{u['sandbox_id']}:{day.isoformat()}", "sandbox_id": u["sandbox_id"],
                        "period": day.isoformat(), "consumer": u["consumer"], "profile": u["profile"],
                        "extension": u["extension"], "start": round(start, 3), "end": round(end, 3),
                        "seconds": round(secs, 3), "cpu": (u["resources"] or {}).get("cpu"),
                        "memory_mb": (u["resources"] or {}).get("memory_mb"),
                        "amount": round(rate * secs, 6), "currency": u["currency"],
                    })
                if end >= u["stopped_at"]:
                    break
                start = end
        return out

    def report(self, since: float | None = None, by: str = "consumer") -> dict[str, dict[str, float]]:
        """Totals of closed and running usage grouped by consumer, profile or backend."""
        key = {"consumer": "consumer", "profile": "profile", "backend": "extension"}[by]
        now = time.time()
        out: dict[str, dict[str, float]] = {}
        for u in self._usage(since):
            start = max(u["started_at"], since or 0)
            end = u["stopped_at"] if u["stopped_at"] is not None else now
            secs = max(0.0, end - start)
            g = out.setdefault(u[key], {"sandboxes": 0, "seconds": 0.0, "amount": 0.0})
            g["sandboxes"] += 1
            g["seconds"] = round(g["seconds"] + secs, 3)
            g["amount"] = round(g["amount"] + _rate(u["price"], u["resources"]) * secs, 6)
        return out

    # --------------------------------------------------------------- export

    def export(self, since: float | None = None, sink: str | None = None) -> dict[str, int]:
        """Queue records for ``sink`` (once per record id) and push what is pending.

        Returns:
            ``{"queued": n, "delivered": n, "pending": n}``.
        """
        settings = self.settings
        name = sink or settings.default_sink
        if not name:
            raise ConfigError("no sink given and no default_sink in settings.yaml; name one with --sink")
        cfg = settings.sinks.get(name)
        if cfg is None:
            raise ConfigError(f"unknown sink {name!r}; configured sinks: {', '.join(settings.sinks) or 'none'}")
        queued = self._state.queue_exports(name, self.records(since))
        pending = self._state.pending_exports(name)
        delivered = 0
        if pending:
            error = None
            try:
                push(cfg, [p["record"] for p in pending])
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.warning("export to sink %s failed; %d records stay queued: %s", name, len(pending), error)
            self._state.mark_exports(name, pending, error)
            delivered = 0 if error else len(pending)
        return {"queued": queued, "delivered": delivered, "pending": len(pending) - delivered}


def render(records: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=RECORD_FIELDS, lineterminator="\n")
        w.writeheader()
        for r in records:
            w.writerow(r)
        return buf.getvalue()
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)


def push(cfg: SinkConfig, records: list[dict[str, Any]]) -> None:
    """Deliver records to one sink.

    Raises:
        OSError: the sink did not take them (after the webhook's retries).
    """
    if cfg.kind == "file":
        path = Path(cfg.path or "")
        path.parent.mkdir(parents=True, exist_ok=True)
        text = render(records, cfg.format)
        if cfg.format == "csv" and path.exists() and path.stat().st_size:
            text = text.split("\n", 1)[1]  # header once
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
        return
    body = render(records, "jsonl").encode()
    # Secret headers are read now, at delivery, and live only in this request; a redirect is
    # not followed, so they never travel to a host the operator did not name.
    try:
        headers = {"Content-Type": "application/x-ndjson", **cfg.resolved_headers()}
    except AuthError as exc:
        raise OSError(f"webhook {cfg.url}: a header's secret is missing: {exc}") from None
    import urllib.error  # here, not at import: a webhook is rare, and urllib.request is slow to load
    import urllib.request

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        """Refuse redirects: urllib would forward the Authorization header to the new host."""

        def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
            return None

    opener = urllib.request.build_opener(_NoRedirect)
    delay = cfg.backoff_s
    last: Exception | None = None
    for attempt in range(cfg.retries + 1):
        req = urllib.request.Request(cfg.url or "", data=body, method="POST", headers=headers)
        try:
            with opener.open(req, timeout=cfg.timeout_s) as resp:  # noqa: S310 - operator-configured URL
                if 200 <= resp.status < 300:
                    return
                last = OSError(f"HTTP {resp.status} from {cfg.url}")
        except urllib.error.HTTPError as exc:
            last = OSError(f"HTTP {exc.code} from {cfg.url}" + (" (redirects are not followed)"
                                                                if 300 <= exc.code < 400 else ""))
        except (urllib.error.URLError, OSError) as exc:
            last = OSError(f"cannot reach {cfg.url}: {getattr(exc, 'reason', exc)}")
        if attempt < cfg.retries:
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
    raise last or OSError("webhook push failed")

