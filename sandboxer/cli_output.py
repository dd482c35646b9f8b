"""What the command line prints: one JSON emitter, tables for people, and create's progress.

The rule of ``--json``: every timestamp is ISO 8601 in UTC with a ``Z``
(``2026-12-02T14:03:00.123Z``, also for the epoch floats state rows hold in ``ts`` and ``*_at``);
every list is a JSON array of objects; a sandbox has the same field names wherever it appears
(``id``, ``name``, ``profile``, ``extension``, ``host``, ``state``, ``consumer``, ``labels``,
``created_at``, ...).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from datetime import datetime, timezone
from typing import Any, Iterator

import click

EPOCH_KEYS = ("ts",)


def timestamp(value: datetime | float) -> str:
    """``2026-12-02T14:03:00.123Z``: the one timestamp format of ``--json``."""
    d = value if isinstance(value, datetime) else datetime.fromtimestamp(value, timezone.utc)
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return d.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def jsonable(value: Any, key: str | None = None) -> Any:
    """``value`` as plain JSON data, timestamps in the one format."""
    if hasattr(value, "model_dump"):
        return jsonable(value.model_dump(mode="python"), key)
    if isinstance(value, datetime):
        return timestamp(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v) for v in items]
    if (isinstance(value, (int, float)) and not isinstance(value, bool) and key is not None
            and (key in EPOCH_KEYS or key.endswith("_at")) and value > 0):
        return timestamp(float(value))
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def emit_json(data: Any, *, compact: bool = False) -> None:
    """Print ``data`` as JSON on stdout (``compact``: one line, for ``--watch``)."""
    if compact:
        click.echo(json.dumps(jsonable(data), sort_keys=True, separators=(",", ":")))
    else:
        click.echo(json.dumps(jsonable(data), indent=2, sort_keys=True))


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    if stderr:
        return Console(stderr=True, highlight=False, soft_wrap=True)
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def table(*columns: str, title: str | None = None) -> Any:
    from rich.table import Table

    return Table(*columns, title=title)


def print_table(t: Any) -> None:
    console().print(t)


def short_time(d: datetime | None) -> str:
    return "-" if d is None else f"{d.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S}Z"


class CreateProgress:
    """Shows a create's stages: a spinner with the stage and elapsed time on a terminal, else one
    line per stage on stderr (``create: provisioning sb-… on ext.local``); a fallback always shows."""

    def __init__(self, profile: str, *, quiet: bool = False):
        self.profile = profile
        self.quiet = quiet
        self.started = time.monotonic()
        self.stage = "starting"
        self.sandbox_ids: list[str] = []
        self._status: Any = None
        self._tty = sys.stderr.isatty()

    def line(self, stage: str, detail: dict[str, Any]) -> str:
        where = detail.get("backend") or ""
        if detail.get("host"):
            where += f" host {detail['host']}"
        sid = detail.get("sandbox_id") or ""
        if stage == "routing":
            return f"routing: profile {detail.get('profile', self.profile)}"
        if stage == "provisioning":
            return f"provisioning {sid} on {where}"
        if stage == "waiting-ready":
            return f"waiting until {sid} is ready on {where}"
        if stage == "fallback":
            reason = str(detail.get("reason") or "failed").splitlines()[0]
            backend = detail.get("backend") or ""
            reason = reason.removeprefix(f"{backend}: ")
            return f"{backend}: {reason}, trying {detail.get('next')}"
        if stage == "ready":
            return f"ready: {sid} on {where}"
        return f"{stage}: {detail}"

    def __call__(self, stage: str, detail: dict[str, Any]) -> None:
        if detail.get("sandbox_id") and detail["sandbox_id"] not in self.sandbox_ids:
            self.sandbox_ids.append(detail["sandbox_id"])
        self.stage = self.line(stage, detail)
        if self.quiet and stage != "fallback":
            return
        elapsed = time.monotonic() - self.started
        if self._status is not None:
            progress, task = self._status
            if stage == "fallback":
                progress.console.print(f"[yellow]{self.stage}[/]")
            progress.update(task, description=self.stage)
        else:
            click.echo(f"create: {self.stage} ({elapsed:.1f}s)", err=True)

    @contextlib.contextmanager
    def spinning(self) -> Iterator[None]:
        """A spinner with the stage and the time elapsed, on a terminal and when not quiet."""
        if not self._tty or self.quiet:
            yield
            return
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=console(stderr=True), transient=True) as progress:
            self._status = (progress, progress.add_task(f"creating a {self.profile} sandbox", total=None))
            try:
                yield
            finally:
                self._status = None
