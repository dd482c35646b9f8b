"""The state store's tables, its schema version and the ordered migrations that reach it."""

from __future__ import annotations

from sqlalchemy import JSON, Column, Float, Index, Integer, MetaData, String, Table, Text, text
from sqlalchemy.engine import Connection

from sandboxer.state.version import LIVE_STATES, SCHEMA_VERSION  # noqa: F401 - the schema's own constants

metadata = MetaData()

meta = Table("meta", metadata, Column("key", String(64), primary_key=True), Column("value", Text, nullable=False))

sandboxes = Table(
    "sandboxes",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(128)),
    Column("profile", String(128), nullable=False),
    Column("extension", String(128), nullable=False),
    Column("host", String(255)),
    Column("state", String(32), nullable=False),
    Column("handle", JSON),
    Column("reachability", JSON),
    Column("consumer", String(255), nullable=False),
    Column("labels", JSON, nullable=False),
    Column("resources", JSON),
    Column("created_at", Float, nullable=False),
    Column("ready_at", Float),
    Column("expires_at", Float, nullable=False),
    Column("terminated_at", Float),
    Column("last_seen_at", Float),
    Column("last_error", Text),
    Column("attempts", Integer, nullable=False, default=0),
    # Migration 3 (issue 8):
    Column("inputs", JSON),  # the inputs the consumer set (never secrets); a snapshot remembers them
    Column("deadline_at", Float),  # a create not ready by then (plus a grace) was abandoned
    Column("policy", JSON),  # migration 4: the sandbox policy it was created under (secret names, never values)
    Column("teardown_started_at", Float),
    Index("ix_sandboxes_state", "state"),
    Index("ix_sandboxes_admission", "extension", "state", "host"),  # live counts per backend/host
    Index(
        "ux_sandboxes_live_name",
        "name",
        unique=True,
        sqlite_where=text("name IS NOT NULL AND state IN ('provisioning','ready','tearing_down','teardown_failed')"),
        postgresql_where=text("name IS NOT NULL AND state IN ('provisioning','ready','tearing_down','teardown_failed')"),
    ),
)

events = Table(
    "events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("sandbox_id", String(64)),
    Column("kind", String(64), nullable=False),
    Column("from_state", String(32)),
    Column("to_state", String(32)),
    Column("consumer", String(255)),
    Column("extension", String(128)),
    Column("detail", JSON),
    Index("ix_events_sandbox", "sandbox_id"),
)

snapshots = Table(
    "snapshots",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("sandbox_id", String(64), nullable=False),
    Column("extension", String(128), nullable=False),
    Column("profile", String(128), nullable=False),
    Column("consumer", String(255), nullable=False),
    Column("state", String(16), nullable=False),  # pending | ready | failed
    Column("created_at", Float, nullable=False),
    Column("size_bytes", Integer),
    Column("checksum", String(128)),
    Column("data", JSON),
    Column("error", Text),
    Column("inputs", JSON),  # migration 3: the inputs of the sandbox it was made from
)

# Migration 3 (issue 8): backend-side names (compose projects, directories) held by sandboxes. A name
# is taken while the sandbox holding it is live; admission checks and records claims in one transaction.
claims = Table(
    "claims",
    metadata,
    Column("scope", String(400), primary_key=True),  # the extension; each name says where it lives
    Column("name", String(400), primary_key=True),
    Column("sandbox_id", String(64), primary_key=True),
    Index("ix_claims_sandbox", "sandbox_id"),
)

# Migration 2 (issue 5): metered usage and the export outbox.
usage = Table(
    "usage",
    metadata,
    Column("sandbox_id", String(64), primary_key=True),
    Column("consumer", String(255), nullable=False),
    Column("profile", String(128), nullable=False),
    Column("extension", String(128), nullable=False),
    Column("resources", JSON),
    Column("price", JSON),
    Column("started_at", Float, nullable=False),
    Column("stopped_at", Float),
    Column("amount", Float),
    Column("currency", String(8)),
    Column("reported", JSON),  # what the backend itself reported (meter_actual), if anything
)

exports = Table(
    "exports",
    metadata,
    Column("record_id", String(128), primary_key=True),
    Column("sink", String(128), primary_key=True),
    Column("record", JSON, nullable=False),
    Column("state", String(16), nullable=False),  # pending | delivered
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("updated_at", Float, nullable=False),
)

# Migration 5 (issue 10): installed extension bundles, their lifecycle, the highest version ever
# installed per publisher (rollback protection outlives a remove), and the trust audit trail.
installed_extensions = Table(
    "installed_extensions",
    metadata,
    Column("id", String(128), primary_key=True),  # the extension id: one installed version at a time
    Column("publisher", String(64), nullable=False),
    Column("version", String(64), nullable=False),
    Column("state", String(16), nullable=False),  # verified | installed | active | disabled
    Column("path", Text),  # <home>/extensions/<id>/<version>
    Column("sha256", String(64)),
    Column("key_id", String(16)),
    Column("grants", JSON),
    Column("dependencies", JSON),
    Column("source", Text),  # where it was installed from (registry manifest or file)
    Column("installed_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

extension_versions = Table(
    "extension_versions",
    metadata,
    Column("publisher", String(64), primary_key=True),
    Column("extension", String(128), primary_key=True),
    Column("highest", String(64), nullable=False),
)

audit = Table(
    "audit",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("who", String(255), nullable=False),  # the OS user (and consumer) who asked
    Column("what", String(64), nullable=False),  # transition | verify_failed | install | remove | ...
    Column("extension", String(128)),
    Column("version", String(64)),
    Column("from_state", String(16)),
    Column("to_state", String(16)),
    Column("reason", Text),  # a TrustError's reason, or why
    Column("detail", JSON),
    Index("ix_audit_extension", "extension"),
)

#: An installed bundle's own rows (``state:own-tables``, through the capability broker): key -> JSON value.
extension_data = Table(
    "extension_data",
    metadata,
    Column("extension", String(128), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("value", JSON),
    Column("updated_at", Float, nullable=False),
)


# Migration 6 (issue 13): machine images built with Packer (ext.vm-packer's build mode). A row is
# written 'building' before ``packer build`` starts and becomes 'ready' once its artifact is known;
# one row per (template, variables) digest pair, and at most one 'building' row per template digest
# (the lock that serialises builds of one template across processes). A 'building' row past its
# deadline was left by a crashed build and is reaped.
images = Table(
    "images",
    metadata,
    Column("id", String(64), primary_key=True),  # sandboxer's record id (names the build's private dir)
    Column("profile", String(128), nullable=False),
    Column("extension", String(128), nullable=False),
    Column("builder", String(64), nullable=False),  # the template's builder type: null, docker, ...
    Column("template", Text, nullable=False),  # the template file's path
    Column("template_sha256", String(64), nullable=False),
    Column("variables_sha256", String(64), nullable=False),
    Column("artifact_id", Text),  # Packer's artifact id, once ready
    Column("state", String(16), nullable=False),  # building | ready
    Column("owner", String(255)),  # host:pid of the process building it
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("deadline_at", Float),  # a 'building' row past it is stale
    Column("detail", JSON),  # Packer's builder id and artifact string
    Index("ux_images_digests", "template_sha256", "variables_sha256", unique=True),
    Index("ix_images_template_state", "template_sha256", "state"),
)


def _migrate_1(conn: Connection) -> None:
    for t in (meta, sandboxes, events, snapshots):
        t.create(conn, checkfirst=True)


def _migrate_2(conn: Connection) -> None:
    for t in (usage, exports):
        t.create(conn, checkfirst=True)


def _migrate_3(conn: Connection) -> None:
    from sqlalchemy import inspect

    claims.create(conn, checkfirst=True)
    insp = inspect(conn)
    for table, names in ((sandboxes, ("inputs", "deadline_at", "teardown_started_at")), (snapshots, ("inputs",))):
        have = {c["name"] for c in insp.get_columns(table.name)}
        for name in names:
            if name not in have:
                col = table.c[name]
                conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {name} {col.type.compile(conn.dialect)}"))


def _migrate_4(conn: Connection) -> None:
    from sqlalchemy import inspect

    if "policy" not in {c["name"] for c in inspect(conn).get_columns(sandboxes.name)}:
        conn.execute(text(f"ALTER TABLE {sandboxes.name} ADD COLUMN policy {sandboxes.c.policy.type.compile(conn.dialect)}"))


def _migrate_5(conn: Connection) -> None:
    for t in (installed_extensions, extension_versions, audit):
        t.create(conn, checkfirst=True)


def _migrate_6(conn: Connection) -> None:
    extension_data.create(conn, checkfirst=True)


def _migrate_7(conn: Connection) -> None:
    images.create(conn, checkfirst=True)


MIGRATIONS = {1: _migrate_1, 2: _migrate_2, 3: _migrate_3, 4: _migrate_4, 5: _migrate_5, 6: _migrate_6, 7: _migrate_7}
