"""What every command shares: the root context (config dirs, home, the Manager built once), the
parameter types (durations, KEY=VALUE pairs, secret references), finding a sandbox by id or
name, the list/teardown filters, and running a call so that Ctrl-C can stop it cleanly.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from sandboxer import durations
from sandboxer.errors import SandboxNotFound

T = TypeVar("T")


class Ctx:
    """The root command's object: what ``--config``, ``--home``, ``--state-url`` said; the Manager."""

    def __init__(self, config: tuple[str, ...], home: str | None, state_url: str | None, debug: bool = False):
        self.config = [Path(c) for c in config] if config else None
        self.home = home
        self.state_url = state_url
        self.debug = debug
        self._mgr = None

    def manager(self):  # type: ignore[no-untyped-def]
        if self._mgr is None:
            from sandboxer.manager import Manager

            # lazy: only what the command needs loads; no refill thread: a command is over in a
            # moment (`sandboxer pool fill` fills)
            self._mgr = Manager(config_dirs=self.config, home=self.home, state_url=self.state_url, lazy=True,
                                refill=False)
        return self._mgr

    def catalog(self):  # type: ignore[no-untyped-def]
        from sandboxer.loader import load_catalog

        if self._mgr:
            return self._mgr.catalog
        from sandboxer.state import default_home

        # what the manager loads: signed bundles installed in its home too
        return load_catalog(self.config, installed=Path(self.home) if self.home else default_home())


pass_ctx = click.make_pass_decorator(Ctx)


class Duration(click.ParamType):
    """``90s``, ``10m``, ``1h30m``, ``2d``: units required; errors name the flag."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        flag = (param.opts[0] if param is not None and param.opts else "duration")
        try:
            return durations.parse_flag(str(value), flag)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param, param_hint=flag) from None


DURATION = Duration()


def pairs(values: tuple[str, ...], flag: str) -> dict[str, str]:
    """``K=V`` options as a dict (a usage error names the flag and the value)."""
    result = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {v!r}", param_hint=flag)
        result[key] = val
    return result


def secret_refs(values: tuple[str, ...]) -> dict[str, Any]:
    """``--secret NAME=env:VAR`` / ``NAME=file:PATH`` as references (resolved by the manager, here).

    A malformed one is refused without echoing what followed ``=``: it may be the value itself.
    """
    from sandboxer.secrets import SecretRef

    refs: dict[str, Any] = {}
    for v in values:
        name, sep, ref = v.partition("=")
        kind, colon, where = ref.partition(":")
        if not (sep and name and colon and where and kind in ("env", "file")):
            shown = f"secret {name!r}" if sep and name else "a secret"
            raise click.BadParameter(f"expected NAME=env:VARIABLE or NAME=file:PATH for {shown} (what follows '=' "
                                     "is not shown: give where the value is, never the value)", param_hint="--secret")
        refs[name] = SecretRef(env=where) if kind == "env" else SecretRef(file=Path(where).expanduser())
    return refs


def resolve(mgr: Any, ref: str) -> str:
    """The id of the sandbox ``ref`` names: an id, or a name (its live sandbox, else the latest one).

    Raises:
        SandboxNotFound: neither.
    """
    read = mgr._read  # the lazy manager's read path: no state store opened for a lookup
    if read("get", ref) is not None:
        return ref
    live = read("get_by_name", ref)
    if live is not None:
        return str(live["id"])
    named = read("list", states=None, where={"name": ref})
    if named:
        return str(named[-1]["id"])
    raise SandboxNotFound(f"no sandbox with id or name {ref!r}")


def filter_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--profile --consumer --label K=V --state --backend``, shared by ``list`` and ``teardown``."""
    for option in reversed((
        click.option("--profile", "f_profile", default=None, help="Only sandboxes of this profile."),
        click.option("--consumer", "f_consumer", default=None, help="Only this consumer's sandboxes."),
        click.option("--label", "f_labels", multiple=True, metavar="K=V", help="Only sandboxes with this label "
                     "(repeatable: all must match)."),
        click.option("--state", "f_state", default=None, help="Only sandboxes in this state (ready, failed, ...)."),
        click.option("--backend", "f_backend", default=None, help="Only sandboxes on this extension (ext.local, ...)."),
    )):
        fn = option(fn)
    return fn


def matching(items: list[Any], *, f_profile: str | None, f_consumer: str | None, f_labels: tuple[str, ...],
             f_state: str | None, f_backend: str | None) -> list[Any]:
    """The statuses the filters keep (``--backend local`` means ``ext.local`` too)."""
    labels = pairs(f_labels, "--label")
    if f_state is not None:
        from sandboxer.models import SandboxState

        states = [s.value for s in SandboxState]
        if f_state not in states:
            raise click.BadParameter(f"{f_state!r} is not a sandbox state; one of: {', '.join(states)}",
                                     param_hint="--state")
    backend = f_backend if f_backend is None or f_backend.startswith("ext.") else f"ext.{f_backend}"
    return [s for s in items
            if (f_profile is None or s.profile == f_profile) and (f_consumer is None or s.consumer == f_consumer)
            and (f_state is None or s.state.value == f_state) and (backend is None or s.extension == backend)
            and all(s.labels.get(k) == v for k, v in labels.items())]


def any_filter(**flags: Any) -> bool:
    return any(v for k, v in flags.items() if k.startswith("f_"))


def in_background(call: Callable[[], T], on_interrupt: Callable[[threading.Thread], None]) -> T:
    """Run ``call`` on a thread and wait for it here, where Ctrl-C lands: on KeyboardInterrupt,
    ``on_interrupt(thread)`` cleans up (a second Ctrl-C stops that too), then it propagates."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = exc

    worker = threading.Thread(target=run, name="sandboxer-cli", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.05)
    except KeyboardInterrupt:
        on_interrupt(worker)
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]
