"""Typed data: manifests, profiles, requests, status, quotes, snapshots.

Every model forbids unknown fields, so a typo in YAML or in a request is an
error that names the field instead of a setting that silently does nothing.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from sandboxer import durations
from sandboxer.policy import GpuRequest, NetworkPolicy, check_secret_names, required
from sandboxer.secrets import HeaderSecret, SecretRef


def parse_duration(value: Any) -> float:
    """Parse ``90`` (seconds), ``"90s"``, ``"30m"``, ``"1h30m"``, ``"2h"`` or ``"1d"`` into seconds.

    Raises:
        ValueError: the value is not a duration (negative values included).
    """
    return durations.seconds(value)


def format_duration(seconds: float) -> str:
    """Render seconds the way a person writes them: ``90s``, ``30m``, ``2h``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


Duration = Annotated[float, BeforeValidator(parse_duration)]


class Strict(BaseModel):
    """Base for every model: unknown fields are an error."""

    model_config = ConfigDict(extra="forbid", defer_build=True)


# ---------------------------------------------------------------- manifests

class Capabilities(Strict):
    isolation_levels: list[str] = Field(min_length=1)
    pricing_model: str
    features: list[str] = Field(default_factory=list)
    enforces: list[str] | None = Field(
        default=None, description="which parts of the sandbox policy it keeps (sandboxer.policy.ENFORCEMENTS); "
        "default: all its class implements; listing fewer narrows that (a host without nftables, say)")


class Pricing(Strict):
    """Prices in the manifest's currency. Metered backends charge per resource-second."""

    currency: str = "USD"
    per_second: float = Field(default=0.0, ge=0)
    per_vcpu_second: float = Field(default=0.0, ge=0)
    per_gib_second: float = Field(default=0.0, ge=0)
    source: str | None = None
    as_of: str | None = None


class WorkerPolicy(Strict):
    """How the worker of a ``runtime: process`` extension is confined (docs/extension-host.md)."""

    sandbox: Literal["none", "namespace"] = Field(
        default="none", description="namespace: run the worker under bubblewrap, the manager's home hidden")
    network: bool = Field(default=False, description="a namespaced worker gets the host's network only if set")


class ExtensionManifest(Strict):
    """One ``extensions/ext.<name>.yaml``."""

    id: str = Field(pattern=r"^ext\.[a-z0-9][a-z0-9-]*$")
    title: str = Field(min_length=1)
    version: str = Field(pattern=r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
    handler: str = Field(min_length=1)
    description: str = ""
    capabilities: Capabilities
    pricing: Pricing | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    #: where the handler runs: in the manager's process, or in a worker process of its own
    #: (docs/extension-host.md). Unset: ``process`` for a handler from an installed package's
    #: entry point, ``in-process`` for a built-in one.
    runtime: Literal["in-process", "process"] | None = None
    worker: WorkerPolicy = Field(default_factory=WorkerPolicy)

    @property
    def name(self) -> str:
        return self.id.split(".", 1)[1]


# ----------------------------------------------------------------- profiles

class Resources(Strict):
    cpu: float = Field(default=1.0, gt=0)
    memory_mb: int = Field(default=512, gt=0)
    disk_mb: int = Field(default=1024, gt=0)
    pids: int = Field(default=256, gt=0, description="most processes at once")
    gpu: GpuRequest | None = Field(default=None, description="GPUs; a backend without them does not qualify")


class ProfileInputs(Strict):
    defaults: dict[str, Any] = Field(default_factory=dict)
    required: list[str] = Field(default_factory=list)


class TTLPolicy(Strict):
    default: Duration = 3600.0
    max: Duration = 86400.0

    @model_validator(mode="after")
    def _default_within_max(self) -> "TTLPolicy":
        if self.default <= 0:
            raise ValueError(f"default TTL must be positive, got {self.default:g}s")
        if self.default > self.max:
            raise ValueError(
                f"default TTL {format_duration(self.default)} is over max {format_duration(self.max)}"
            )
        return self


#: The most sandboxes one profile's pool may keep ready.
POOL_MAX_SIZE = 100
#: The consumer a pooled sandbox is recorded under until it is handed out (reserved: a request may not use it).
POOL_CONSUMER = "sandboxer.pool"


class PoolPolicy(Strict):
    """A profile's warm pool: ``size`` sandboxes kept provisioned and ready, each for at most ``max_age``
    (docs/pools.md)."""

    size: int = Field(ge=0, le=POOL_MAX_SIZE, description="how many ready sandboxes to keep (0: none)")
    max_age: Duration = Field(default=600.0, description="a pooled sandbox older than this is reaped, not handed out")

    @field_validator("max_age")
    @classmethod
    def _age(cls, v: float) -> float:
        if not 10.0 <= v <= 86400.0:
            raise ValueError(f"max_age must be between 10s and 1d, got {format_duration(v)}")
        return v


class BackendChoice(Strict):
    """One entry of a profile's ordered ``backends`` list."""

    extension: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    capacity: int | None = Field(default=None, ge=0, description="most live sandboxes here")
    capacity_per_host: int | None = Field(default=None, ge=0)
    cost_ceiling: float | None = Field(default=None, ge=0, description="per-sandbox quote cap")
    hosts: list[str] = Field(default_factory=list)


class Profile(Strict):
    """One ``profiles/profile.<slug>.yaml``.

    A profile names one ``extension`` or an ordered list of ``backends``;
    :attr:`candidates` always gives the list.
    """

    slug: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    description: str = ""
    extension: str | None = None
    backends: list[BackendChoice] | None = None
    routing: Literal["priority", "cheapest"] = "priority"
    isolation: str | None = None
    inputs: ProfileInputs = Field(default_factory=ProfileInputs)
    ttl: TTLPolicy = Field(default_factory=TTLPolicy)
    ready_timeout: Duration = 60.0
    resources: Resources = Field(default_factory=Resources)
    labels: dict[str, str] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    network: NetworkPolicy = Field(default_factory=NetworkPolicy,
                                   description="what the sandbox may reach and serve; default: no network")
    secrets: dict[str, SecretRef] = Field(
        default_factory=dict, description="environment variables for the sandbox, from secret references")
    pool: PoolPolicy | None = Field(default=None, description="keep sandboxes of this profile ready (docs/pools.md)")

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, v: dict[str, SecretRef]) -> dict[str, SecretRef]:
        return check_secret_names(v)

    def policy(self) -> dict[str, Any]:
        """The sandbox policy as recorded with a sandbox: secrets by name only, never a reference."""
        gpu = self.resources.gpu
        return {"network": self.network.model_dump(mode="json"), "secrets": sorted(self.secrets),
                "gpu": gpu.model_dump(mode="json") if gpu else None}

    def enforcements(self) -> list[str]:
        """What a backend must enforce to run this profile's sandboxes (sandboxer.policy.required)."""
        return required(self.network, self.secrets, self.resources.gpu)

    @model_validator(mode="after")
    def _one_way_to_name_backends(self) -> "Profile":
        if (self.extension is None) == (self.backends is None):
            raise ValueError("give exactly one of 'extension' or 'backends'")
        if self.backends is not None and not self.backends:
            raise ValueError("'backends' must list at least one extension")
        return self

    @property
    def candidates(self) -> list[BackendChoice]:
        if self.backends is not None:
            return self.backends
        return [BackendChoice(extension=self.extension or "", options=self.options)]


# ----------------------------------------------------------------- requests

class SandboxCreateRequest(Strict):
    """What a consumer asks for. ``consumer`` is attribution, never an input."""

    profile: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    ttl: Duration | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    consumer: str = "anonymous"
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

    @field_validator("consumer")
    @classmethod
    def _not_the_pool(cls, v: str) -> str:
        if v == POOL_CONSUMER:
            raise ValueError(f"consumer {POOL_CONSUMER!r} is reserved for the sandboxes of warm pools")
        return v

    @field_validator("ttl", mode="before")
    @classmethod
    def _ttl_positive(cls, v: Any) -> Any:
        if v is not None and parse_duration(v) <= 0:
            raise ValueError(f"TTL must be positive, got {v!r}")
        return v


class SandboxState(str, Enum):
    PROVISIONING = "provisioning"
    READY = "ready"
    TEARING_DOWN = "tearing_down"
    TERMINATED = "terminated"
    TEARDOWN_FAILED = "teardown_failed"
    FAILED = "failed"
    LOST = "lost"  # the backend no longer has it (killed by its provider); usage closed when last seen

    @property
    def live(self) -> bool:
        return self not in (SandboxState.TERMINATED, SandboxState.FAILED, SandboxState.LOST)


class SandboxStatus(Strict):
    id: str
    name: str | None = None
    profile: str
    extension: str
    host: str | None = None
    state: SandboxState
    reachability: dict[str, Any] = Field(default_factory=dict)
    consumer: str
    labels: dict[str, str] = Field(default_factory=dict)
    created_at: datetime
    ready_at: datetime | None = None
    expires_at: datetime
    terminated_at: datetime | None = None
    last_error: str | None = None
    #: the sandbox policy it was created under: network, the names of its secrets, GPUs
    policy: dict[str, Any] = Field(default_factory=dict)


class ExecResult(Strict):
    """What one exec did (the convention is sandboxer/execution.py's).

    Attributes:
        exit_code: the command's exit code; 124 when it was killed at its deadline.
        stdout: its standard output, whole UTF-8 characters, up to the backend's output cap.
        stderr: its standard error, likewise.
        timed_out: the command was killed at its deadline (and nothing it started runs on).
        truncated: output past the cap was cut (neither kept nor streamed); the command ran on.
    """

    exit_code: int
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    truncated: bool = False


class MeterQuote(Strict):
    """A price, before (estimate) or after (actual) a sandbox's life."""

    extension: str
    profile: str
    duration_s: float
    amount: float
    currency: str = "USD"
    pricing_model: str
    kind: Literal["estimate", "actual"] = "estimate"
    breakdown: dict[str, float] = Field(default_factory=dict)
    source: str | None = None


class SnapshotMeta(Strict):
    id: str
    sandbox_id: str
    extension: str
    profile: str
    consumer: str = "anonymous"
    created_at: datetime
    size_bytes: int | None = None
    checksum: str | None = None
    data: dict[str, Any] = Field(default_factory=dict, description="the backend's own reference")
    inputs: dict[str, Any] = Field(default_factory=dict, description="the inputs its sandbox was created with")


class CleanupReport(Strict):
    expired: list[str] = Field(default_factory=list)
    retried: list[str] = Field(default_factory=list)
    orphans: list[str] = Field(default_factory=list)
    stale_provisioning: list[str] = Field(default_factory=list)
    lost: list[str] = Field(default_factory=list, description="ready sandboxes their backend no longer has")
    images: list[str] = Field(default_factory=list,
                              description="image build records removed: builds whose process is gone (vm-packer)")
    errors: dict[str, str] = Field(default_factory=dict)


# ----------------------------------------------------------------- settings

class Budget(Strict):
    """A cap on one consumer's spend per period (``*`` applies to every consumer without its own)."""

    limit: float = Field(ge=0)
    period: Literal["day", "month"] = "month"


class SinkConfig(Strict):
    """Where usage records are pushed: a file (JSONL or CSV) or an HTTP webhook.

    A webhook header is a plain string or, for a secret, a reference resolved at each
    delivery: ``{env: NAME, prefix: "Bearer "}`` or ``{file: PATH}``. An Authorization
    header must be a reference, so no token is ever written in ``settings.yaml``.
    """

    kind: Literal["file", "webhook"]
    path: str | None = None
    format: Literal["jsonl", "csv"] = "jsonl"
    url: str | None = None
    headers: dict[str, str | HeaderSecret] = Field(default_factory=dict)
    retries: int = Field(default=5, ge=0, le=20)
    backoff_s: float = Field(default=0.5, ge=0, le=60)
    timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _no_literal_credentials(cls, data: Any) -> Any:
        # Checked before field validation so the error cannot quote the value: it is a token.
        credential_headers = ("authorization", "proxy-authorization", "x-api-key")
        headers = data.get("headers") if isinstance(data, dict) else None
        for name, value in headers.items() if isinstance(headers, dict) else ():
            if str(name).lower() in credential_headers and isinstance(value, str):
                raise ValueError(
                    f"header {name!r} must be a reference, {{env: NAME, prefix: \"Bearer \"}} or "
                    "{file: PATH}, not a literal value (see docs/payments.md)"
                )
        return data

    @model_validator(mode="after")
    def _target(self) -> "SinkConfig":
        if self.kind == "file" and not self.path:
            raise ValueError("a file sink needs 'path'")
        if self.kind == "webhook" and not (self.url and self.url.startswith(("http://", "https://"))):
            raise ValueError("a webhook sink needs an http(s) 'url'")
        return self

    def resolved_headers(self) -> dict[str, str]:
        """The headers to send now, references resolved (AuthError names one that is unset)."""
        return {k: v.value() if isinstance(v, HeaderSecret) else v for k, v in self.headers.items()}


class Settings(Strict):
    """``settings.yaml`` in a config directory: budgets and meter-export sinks."""

    budgets: dict[str, Budget] = Field(default_factory=dict)
    sinks: dict[str, SinkConfig] = Field(default_factory=dict)
    default_sink: str | None = None
