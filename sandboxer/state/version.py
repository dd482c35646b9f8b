"""The schema version and the live states: what a reader checks before it reads (no SQLAlchemy here)."""

SCHEMA_VERSION = 7
LIVE_STATES = ("provisioning", "ready", "tearing_down", "teardown_failed")
