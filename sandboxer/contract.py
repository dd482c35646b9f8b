"""What crosses the extension boundary: the typed request, handle, reachability and reports.

The manager and a backend exchange only these models (and :class:`~sandboxer.models.ExecResult`),
never loose dicts. The manager keeps handles in its state store as JSON, and turns them back into
the backend's own :attr:`~sandboxer.extensions.base.SandboxExtension.Handle` model before each call,
so a backend reads ``handle.container`` rather than ``handle["container"]``. What a backend returns
is checked here, once, by :func:`checked`: a wrong type is an error naming the backend and the
method, never a surprise three calls later.

Rule kept here: a handle is stored in the state store, so it never holds a secret; a
:class:`ProvisionRequest`'s reserved fields are set by the manager alone, and its secret values
never appear in its ``repr`` or in any dump of it.
"""

from __future__ import annotations

from contextvars import ContextVar
from datetime import datetime
from typing import Any, Callable, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, SerializeAsAny, ValidationError

from sandboxer.errors import BackendError, SandboxerError
from sandboxer.models import ExecResult, Profile

T = TypeVar("T")
C = TypeVar("C")

#: Names a consumer may not use as inputs: the manager sets them as :class:`ProvisionRequest` fields.
RESERVED_INPUTS = frozenset({"sandbox_id", "owner_labels", "tags", "ttl"})


class ProvisionRequest(BaseModel):
    """Everything a backend's ``provision`` (or ``restore_from_snapshot``) is given.

    Attributes:
        profile: the effective profile (its ``options`` are this backend's; see ``options()``).
        inputs: the profile's defaults merged with the consumer's inputs (never a reserved name).
        sandbox_id: the manager's id for the sandbox; record it where ``list_owned`` can read it.
        owner_labels: the labels naming this manager's state store (``{"sandboxer.owner": ...}``);
            ``list_owned`` is asked for these.
        tags: what to attach to whatever the backend creates (labels, metadata, tags): the owner
            labels plus ``sandboxer.sandbox_id``, ``sandboxer.consumer``, ``sandboxer.profile``
            and the request's labels. A backend that cannot attach tags must still record
            ``sandbox_id`` and ``owner_labels`` where ``list_owned`` can read them.
        ttl: the sandbox's lifetime in seconds (already checked against the profile's maximum),
            for a backend that can expire sandboxes itself.
        host: the host the router chose, or None to let the backend pick.
        secrets: the values of the sandbox's secrets (the profile's ``secrets``, resolved by the
            manager before anything is recorded), for the sandbox's environment alone. Masked in
            ``repr`` and ``str`` and left out of every dump: a backend passes them to the sandbox
            and never into its handle, reachability, labels, files or messages.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: Profile
    inputs: dict[str, Any] = Field(default_factory=dict)
    sandbox_id: str = Field(min_length=1)
    owner_labels: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    ttl: float = Field(default=3600.0, gt=0)
    host: str | None = None
    # exclude: no dump of a request (state, events, the host ABI's generic path) can carry a value;
    # the host ABI carries them deliberately (sandboxer.host.client._request).
    secrets: dict[str, SecretStr] = Field(default_factory=dict, exclude=True, repr=False)

    def secret_env(self) -> dict[str, str]:
        """The secrets as environment variables, values in clear: only for the sandbox's environment."""
        return {k: v.get_secret_value() for k, v in self.secrets.items()}


class Handle(BaseModel):
    """What a backend needs to find its sandbox again; stored in the state store (never a secret).

    A backend subclasses it with its own fields and names the subclass as its ``Handle``. The
    base keeps unknown fields, so a handle read back by a manager that does not know the
    backend's class (an out-of-process extension) loses nothing on its way to the worker.
    """

    model_config = ConfigDict(extra="allow")

    host: str | None = Field(default=None, description="the host the sandbox is on, when known")


class Reachability(BaseModel):
    """How a consumer reaches a ready sandbox (shown by ``status``; never a secret).

    The common fields are optional; a backend adds its own (or subclasses this).
    """

    model_config = ConfigDict(extra="allow")

    host: str | None = None
    address: str | None = Field(default=None, description="host or IP to connect to")
    ssh: str | None = Field(default=None, description="an ssh command line that reaches it")
    url: str | None = None
    urls: dict[str, str] = Field(default_factory=dict,
                                 description="port -> the URL that reaches it, for each port of network.expose")


class TeardownReport(BaseModel):
    """What a teardown did.

    Attributes:
        already_gone: the sandbox was gone before this teardown (the backend ended it, or it
            was lost): billing then stops when the manager last saw it alive, not now.
        removed: what was removed (container ids, directories, projects), for the operator.
        detail: anything else worth recording (stored with the sandbox's events).
    """

    model_config = ConfigDict(extra="forbid")

    already_gone: bool = False
    removed: list[str] = Field(default_factory=list)
    detail: dict[str, Any] = Field(default_factory=dict)


class SnapshotResult(BaseModel):
    """What ``snapshot`` made: the backend's reference to it, stored in the snapshot catalog."""

    model_config = ConfigDict(extra="forbid")

    data: dict[str, Any] = Field(description="what restore_from_snapshot and delete_snapshot need (never a secret)")
    size_bytes: int | None = Field(default=None, ge=0)
    checksum: str | None = None


class OwnedSandbox(BaseModel):
    """One resource ``list_owned`` found carrying the owner labels."""

    model_config = ConfigDict(extra="forbid")

    sandbox_id: str | None = Field(description="the sandbox id it was tagged with (None: it carries none)")
    handle: SerializeAsAny[Handle]


class FileInfo(BaseModel):
    """One entry ``list_files`` found (feature ``files``)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="its absolute path inside the sandbox")
    name: str = Field(description="the last component of path")
    type: Literal["file", "dir", "symlink", "other"]
    size: int = Field(ge=0, description="bytes (0 for a directory)")
    mode: int | None = Field(default=None, ge=0, description="permission bits (0o7777 mask), when the backend knows them")
    modified_at: datetime | None = Field(default=None, description="last modification, UTC, when the backend knows it")


#: Methods whose first argument is a handle.
HANDLE_METHODS = frozenset({"wait_ready", "teardown", "exec", "snapshot", "meter_actual", "probe", "handle_id",
                            "write_file", "read_file", "list_files", "remove_file", "set_ttl"})


def load_handle(cls: type[Handle], stored: Handle | dict[str, Any], *, what: str, backend: str) -> Handle:
    """A stored handle (JSON from the state store) as the backend's ``Handle`` model.

    Raises:
        BackendError: it does not fit the model (a record written by an older backend version).
    """
    if isinstance(stored, cls):
        return stored
    data = stored.model_dump(mode="json") if isinstance(stored, BaseModel) else stored
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise BackendError(
            f"{what}: the recorded handle does not fit {backend}'s {cls.__name__}: "
            f"{_first_error(exc)}; the record was written by another version of {backend}",
            backend=backend,
        ) from None


def dump(model: BaseModel | None) -> dict[str, Any] | None:
    """A model as the JSON the state store keeps."""
    return None if model is None else model.model_dump(mode="json")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "(the whole value)"
    return f"{where}: {err.get('msg')}"


def _as(model: type[BaseModel], value: Any, backend: str, method: str) -> Any:
    if isinstance(value, model):
        return value
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise BackendError(f"{backend}.{method} returned {type(value).__name__}, not a {model.__name__}: "
                           f"{_first_error(exc)}", backend=backend) from None


def checked(method: str, value: Any, *, backend: str, handle_cls: type[Handle] = Handle) -> Any:
    """What a backend's ``method`` returned, as the contract's type (a dict is validated into it).

    Raises:
        BackendError: the value does not fit, naming the backend and the method.
    """
    if method in ("provision", "restore_from_snapshot"):
        return _as(handle_cls, value, backend, method)
    if method == "wait_ready":
        return _as(Reachability, value, backend, method)
    if method == "teardown":
        return _as(TeardownReport, {} if value is None else value, backend, method)
    if method == "snapshot":
        return _as(SnapshotResult, value, backend, method)
    if method == "exec":
        return _as(ExecResult, value, backend, method)
    if method == "list_owned":
        if not isinstance(value, (list, tuple)):
            raise BackendError(f"{backend}.list_owned returned {type(value).__name__}, not a list of OwnedSandbox",
                               backend=backend)
        out = []
        for item in value:
            owned = _as(OwnedSandbox, item, backend, method)
            handle = owned.handle
            if not isinstance(handle, handle_cls):
                handle = _as(handle_cls, handle.model_dump(mode="json"), backend, method)
            out.append(OwnedSandbox(sandbox_id=owned.sandbox_id, handle=handle))
        return out
    if method == "probe":
        if value is not None and not isinstance(value, bool):
            raise BackendError(f"{backend}.probe returned {value!r}, not True, False or None", backend=backend)
        return value
    if method == "list_files":
        if not isinstance(value, (list, tuple)):
            raise BackendError(f"{backend}.list_files returned {type(value).__name__}, not a list of FileInfo",
                               backend=backend)
        return [_as(FileInfo, item, backend, method) for item in value]
    if method in ("write_file", "read_file"):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BackendError(f"{backend}.{method} returned {value!r}, not a byte count", backend=backend)
        return value
    if method == "resource_names":
        if not isinstance(value, (list, tuple)) or not all(isinstance(n, str) for n in value):
            raise BackendError(f"{backend}.resource_names returned {value!r}, not a list of strings", backend=backend)
        return list(value)
    return value


def bound(ext: Any, method: str, what: str) -> Callable[..., Any]:
    """``ext.<method>`` at the typed boundary: a stored handle argument becomes the backend's
    ``Handle`` model, and the result is checked against the contract (a wrong type is a
    BackendError naming the backend and the method). ``what`` names the call in errors."""
    fn = getattr(ext, method)

    def call(*args: Any, **kwargs: Any) -> Any:
        if args and method in HANDLE_METHODS:
            args = (load_handle(ext.Handle, args[0], what=what, backend=ext.id), *args[1:])
        return checked(method, fn(*args, **kwargs), backend=ext.id, handle_cls=ext.Handle)

    return call


def translated(call: Callable[[], T], table: "ErrorTable | Callable[[Exception], SandboxerError | None]") -> T:
    """Run ``call``; a foreign exception becomes our error, raised *outside* the ``except`` block.

    So neither its ``__cause__`` nor its ``__context__`` (nor a frame's locals) keeps the
    provider's exception, which may hold a key. ``table`` maps it (an :class:`ErrorTable`, or a
    function returning None for an exception that is not the SDK's: that one is re-raised as
    it is). Our own errors pass through untouched. httpx's ``map_httpcore_exceptions`` is the model.
    """
    translate = table.translate if isinstance(table, ErrorTable) else table
    try:
        return call()
    except SandboxerError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated below, or re-raised untouched
        mapped = translate(exc)
        if mapped is None:
            raise
    raise mapped


def translated_with(var: "ContextVar[C]", value: C, call: Callable[[], T],
                    table: "ErrorTable | Callable[[Exception], SandboxerError | None]") -> T:
    """:func:`translated`, with ``value`` set in ``var`` while it runs: what the call is, whose key,
    the fallback class, for the table's makers, which are given only the exception."""
    token = var.set(value)
    try:
        return translated(call, table)
    finally:
        var.reset(token)


class ErrorTable:
    """One backend's declared map from its SDK's exceptions to ours.

    Args:
        rows: ``{SDKException: maker}`` where ``maker(exc)`` returns our error (or None to
            fall through to a base class's row); looked up along the exception's MRO, so a
            row for a base class covers its subclasses and the most specific row wins.
    """

    def __init__(self, rows: dict[type[BaseException], Callable[[BaseException], SandboxerError | None]]):
        self.rows = dict(rows)

    def translate(self, exc: BaseException) -> SandboxerError | None:
        for klass in type(exc).__mro__:
            maker = self.rows.get(klass)
            if maker is not None:
                mapped = maker(exc)
                if mapped is not None:
                    return mapped
        return None

    def __call__(self, exc: BaseException) -> SandboxerError | None:
        return self.translate(exc)
