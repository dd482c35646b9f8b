"""Quotes, usage records, budgets and export sinks.

Rules kept here: a quote is priced from the manifest's ``pricing`` (metered
backends per resource-second, self-hosted ones at their amortised rate or
zero); every sandbox's usage interval is recorded in the state store (start,
stop, resources, price); an interval the orchestrator could not close is
closed at the last time the sandbox was seen alive; each exported record has
a stable id and goes through an outbox, so a push that fails is retried, never
lost, and exporting again never duplicates. A webhook's secret headers are
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
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, bindparam, insert, select, update
from sqlalchemy.engine import Connection

from sandboxer.errors import AuthError, BudgetExceeded, ConfigError
from sandboxer.models import ExtensionManifest, MeterQuote, Pricing, Profile, SinkConfig
from sandboxer.state import exports, sandboxes, usage

if TYPE_CHECKING:
    from sandboxer.manager import Manager

log = logging.getLogger("sandboxer.metering")

_INSERT_USAGE = insert(usage)
_SELECT_USAGE = select(usage).where(usage.c.sandbox_id == bindparam("_id"))
_UPDATE_USAGE = update(usage).where(usage.c.sandbox_id == bindparam("_id"))

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
    def __init__(self, manager: "Manager"):
        self.manager = manager

    @property
    def _state(self):  # type: ignore[no-untyped-def]
        return self.manager.state

    # --------------------------------------------------------------- quotes

    def quote(self, profile: Profile, index: int, duration: float) -> MeterQuote:
        loaded = self.manager.catalog.extensions[profile.candidates[index].extension]
        eff = self.manager.effective_profile(profile, index)
        if loaded.missing_extra:
            return price(loaded.manifest, eff, duration)
        return self.manager.extension(loaded.manifest.id).estimate_cost(eff, duration)

    # --------------------------------------------------------------- actuals

    def started(self, conn: Connection, row: dict[str, Any]) -> None:
        """Open the usage interval of a sandbox that just became ready (inside its transition)."""
        manifest = self.manager.catalog.extensions[row["extension"]].manifest
        pricing = manifest.pricing or Pricing()
        conn.execute(_INSERT_USAGE, {
            "sandbox_id": row["id"], "consumer": row["consumer"], "profile": row["profile"],
            "extension": row["extension"], "resources": row["resources"], "price": pricing.model_dump(),
            "started_at": row["ready_at"], "stopped_at": None, "amount": None, "currency": pricing.currency,
        })

    def stopped(self, conn: Connection, sandbox_id: str, ts: float, reported: dict[str, Any] | None = None) -> None:
        """Close a usage interval, priced from the recorded rate or refined by the backend's own figures.

        ``reported`` (from ``meter_actual``) may carry ``cost`` (the provider's amount) or
        ``rate_per_second`` (the provider's rate for this sandbox's real size).
        """
        u = conn.execute(_SELECT_USAGE, {"_id": sandbox_id}).mappings().first()
        if u is None or u["stopped_at"] is not None:
            return
        stop = max(ts, u["started_at"])
        rate = _rate(u["price"], u["resources"])
        if reported and isinstance(reported.get("rate_per_second"), (int, float)):
            rate = float(reported["rate_per_second"])
        amount = rate * (stop - u["started_at"])
        if reported and isinstance(reported.get("cost"), (int, float)):
            amount = float(reported["cost"])
        conn.execute(_UPDATE_USAGE, {"_id": sandbox_id, "stopped_at": stop, "amount": round(amount, 6), "reported": reported})

    def close_abandoned(self) -> None:
        """Close intervals of sandboxes that ended while nobody was watching."""
        with self._state._tx() as conn:
            rows = conn.execute(
                select(usage.c.sandbox_id, usage.c.started_at, usage.c.price, usage.c.resources,
                       sandboxes.c.terminated_at, sandboxes.c.last_seen_at)
                .join(sandboxes, sandboxes.c.id == usage.c.sandbox_id)
                .where(and_(usage.c.stopped_at.is_(None), sandboxes.c.state.in_(("terminated", "failed"))))
            ).mappings().all()
            for r in rows:
                stop = max(r["started_at"], r["last_seen_at"] or r["terminated_at"] or r["started_at"])
                amount = round(_rate(r["price"], r["resources"]) * (stop - r["started_at"]), 6)
                conn.execute(update(usage).where(usage.c.sandbox_id == r["sandbox_id"]).values(stopped_at=stop, amount=amount))

    def _usage(self, since: float | None = None) -> list[dict[str, Any]]:
        q = select(usage)
        if since is not None:
            q = q.where((usage.c.stopped_at.is_(None)) | (usage.c.stopped_at >= since))
        with self._state._tx(write=False) as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

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
        budgets = self.manager.catalog.settings.budgets
        return consumer in budgets or "*" in budgets

    def check_budget(self, consumer: str, quote: MeterQuote) -> None:
        """Refuse a create whose quote would take ``consumer`` over its budget.

        Raises:
            BudgetExceeded: before anything is provisioned.
        """
        budgets = self.manager.catalog.settings.budgets
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
        settings = self.manager.catalog.settings
        name = sink or settings.default_sink
        if not name:
            raise ConfigError("no sink given and no default_sink in settings.yaml; name one with --sink")
        cfg = settings.sinks.get(name)
        if cfg is None:
            raise ConfigError(f"unknown sink {name!r}; configured sinks: {', '.join(settings.sinks) or 'none'}")
        recs = self.records(since)
        now = time.time()
        queued = 0
        with self._state._tx() as conn:
            have = {r for (r,) in conn.execute(select(exports.c.record_id).where(exports.c.sink == name))}
            for rec in recs:
                if rec["id"] not in have:
                    conn.execute(insert(exports).values(record_id=rec["id"], sink=name, record=rec, state="pending",
                                                        attempts=0, updated_at=now))
                    queued += 1
        with self._state._tx(write=False) as conn:
            pending = [dict(r) for r in conn.execute(select(exports).where(and_(
                exports.c.sink == name, exports.c.state == "pending")).order_by(exports.c.record_id)).mappings()]
        delivered = 0
        if pending:
            error = None
            try:
                push(cfg, [p["record"] for p in pending])
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.warning("export to sink %s failed; %d records stay queued: %s", name, len(pending), error)
            with self._state._tx() as conn:
                for p in pending:
                    values: dict[str, Any] = {"attempts": p["attempts"] + 1, "updated_at": time.time(), "last_error": error}
                    if error is None:
                        values["state"] = "delivered"
                    conn.execute(update(exports).where(and_(exports.c.record_id == p["record_id"],
                                                            exports.c.sink == name)).values(**values))
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


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: urllib would forward the Authorization header to the new host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None
