"""Building a :class:`~sandboxer.contract.ProvisionRequest` by hand, to call a backend directly in a test.

The manager builds every request itself; an extension author's tests call ``provision`` with
one of these instead. :func:`request` takes the inputs the old way too (the reserved
``sandbox_id``, ``owner_labels``, ``tags`` and ``ttl`` mixed in), and moves them to their fields.
"""

from __future__ import annotations

import uuid
from typing import Any

from sandboxer.contract import RESERVED_INPUTS, ProvisionRequest
from sandboxer.models import Profile


def request(profile: Profile, inputs: dict[str, Any] | None = None, host: str | None = None,
            **fields: Any) -> ProvisionRequest:
    """A request for ``profile`` with ``inputs`` on ``host``.

    Reserved names found in ``inputs`` become fields; ``fields`` set them too (``sandbox_id``
    defaults to a fresh ``sb-test-...`` id, ``tags`` to the owner labels plus the sandbox id).
    """
    given = dict(inputs or {})
    for name in RESERVED_INPUTS:
        if name in given:
            fields.setdefault(name, given.pop(name))
    sid = fields.setdefault("sandbox_id", "sb-test-" + uuid.uuid4().hex[:10])
    owner = fields.setdefault("owner_labels", {})
    fields.setdefault("tags", {**owner, "sandboxer.sandbox_id": sid})
    return ProvisionRequest(profile=profile, inputs=given, host=host, **fields)
