"""ext.docker's secrets: the container's environment (every docker exec inherits it), and never the
handle, the reachability, the labels or a snapshot's image."""

from __future__ import annotations

import hashlib
import json
import secrets as _random
import uuid

import pytest

from sandboxer.errors import SnapshotError
from sandboxer.models import SnapshotMeta
from sandboxer.testing import request

pytestmark = pytest.mark.root


def _sees(name: str, value: str) -> list[str]:
    digest = hashlib.sha256(value.encode()).hexdigest()
    return ["sh", "-c", f'[ "$(printf %s "${name}" | sha256sum | cut -d" " -f1)" = {digest} ]']


def _req(profile, owner, **secrets):
    sid = f"t-{uuid.uuid4().hex[:10]}"
    return request(profile, {"sandbox_id": sid, "owner_labels": owner, "tags": {**owner, "sandboxer.sandbox_id": sid}},
                   None, secrets=secrets)


def _engine_copies_container_config(dclient) -> bool:
    return int(dclient.version()["Version"].split(".")[0]) < 25


def test_the_container_holds_the_secrets_and_no_snapshot_image_does(ext, profile, owner, dclient):
    value = "sbx_DOCKER_" + _random.token_hex(12)
    odd = "with spaces\nand a newline; $(touch /tmp/x)"
    handle = ext.provision(_req(profile, owner, TOKEN=value, ODD=odd))
    made: list = [handle]
    try:
        reach = ext.wait_ready(handle, timeout=30)
        assert ext.exec(handle, _sees("TOKEN", value)).exit_code == 0
        assert ext.exec(handle, _sees("ODD", odd)).exit_code == 0
        assert ext.exec(handle, ["sh", "-c", 'test "$TOKEN" = mine'], env={"TOKEN": "mine"}).exit_code == 0
        assert handle.secrets == ["ODD", "TOKEN"]
        assert value not in handle.model_dump_json() and value not in reach.model_dump_json()
        assert value not in json.dumps(dclient.containers.get(handle.container_id).labels)

        sid = handle.sandbox_id
        if _engine_copies_container_config(dclient):
            with pytest.raises(SnapshotError) as err:
                ext.snapshot(handle)
            assert str(err.value) == (
                f"ext.docker: cannot snapshot sandbox {sid}: the Docker engine at {ext.engine} writes the container's "
                f"environment, which holds its secrets (ODD, TOKEN), into a committed image (its ContainerConfig; "
                f"Docker 25 and later do not); the image was removed. Snapshot it on a newer engine, or use a profile "
                f"without secrets")
            assert dclient.images.list(filters={"label": f"sandboxer.snapshot_of={sid}"}) == []
        else:
            out = ext.snapshot(handle)
            image = dclient.images.get(out.data["image"])
            assert value not in json.dumps(image.attrs) and odd not in json.dumps(image.attrs)
        for img in dclient.images.list():
            assert value not in json.dumps(img.attrs)

        # a snapshot of a sandbox without secrets restores under secrets: the new container gets them
        plain = ext.provision(_req(profile, owner))
        made.append(plain)
        ext.wait_ready(plain, timeout=30)
        out = ext.snapshot(plain)
        meta = SnapshotMeta(id="snap-test", sandbox_id=plain.sandbox_id, extension=ext.id, profile="docker",
                            created_at="2026-11-21T00:00:00Z", size_bytes=out.size_bytes, checksum=out.checksum,
                            data=out.data)
        restored = ext.restore_from_snapshot(_req(profile, owner, TOKEN=value), meta)
        made.append(restored)
        ext.wait_ready(restored, timeout=30)
        assert ext.exec(restored, _sees("TOKEN", value)).exit_code == 0
        ext.delete_snapshot(meta)
    finally:
        for h in made:
            ext.teardown(h)
