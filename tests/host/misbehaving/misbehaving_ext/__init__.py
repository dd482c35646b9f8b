"""A deliberately misbehaving extension: what a third party's bug looks like to the host.

Sandboxes are files under its home (so a new worker still finds them). ``exec`` misbehaves by
its ``argv[0]``: ``raise`` (a foreign exception), ``hang``, ``abort`` (``os.abort()``),
``garbage`` (a line that is not the protocol on the protocol stream), ``print`` (a stray print,
which the worker keeps off the protocol stream), ``huge N [ascii]`` (N MiB streamed and returned),
``exit`` (``os._exit(3)``); anything else echoes its arguments. A teardown of a sandbox created
with the input ``hang_teardown`` hangs.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from sandboxer.extensions.base import SandboxExtension
from sandboxer.models import ExecResult

RELEASE = threading.Event()  # never set inside a worker: a hang lasts until the worker is killed


class MisbehavingExtension(SandboxExtension):
    features = frozenset({"exec", "list_owned"})
    enforces = frozenset({"network:none"})  # it runs nothing that could reach out

    # Sloppy on purpose: it returns dicts, which the host's boundary validates into the contract's models.

    def _path(self, sandbox_id: str):  # type: ignore[no-untyped-def]
        return self.home / "boxes" / f"{sandbox_id}.json"

    def provision(self, request):  # type: ignore[no-untyped-def]
        (self.home / "boxes").mkdir(parents=True, exist_ok=True)
        handle = {"sandbox_id": request.sandbox_id, "hang_teardown": bool(request.inputs.get("hang_teardown"))}
        self._path(request.sandbox_id).write_text(json.dumps({"owner_labels": request.owner_labels, **handle}))
        return handle

    def wait_ready(self, handle, timeout=60.0):  # type: ignore[no-untyped-def]
        return {"pid": os.getpid()}

    def teardown(self, handle):  # type: ignore[no-untyped-def]
        if getattr(handle, "hang_teardown", False):
            RELEASE.wait(3600)
        path = self._path(handle.sandbox_id)
        gone = not path.exists()
        path.unlink(missing_ok=True)
        return {"already_gone": gone}

    def list_owned(self, owner_labels):  # type: ignore[no-untyped-def]
        out = []
        for p in sorted((self.home / "boxes").glob("*.json")):
            rec = json.loads(p.read_text())
            if all(rec["owner_labels"].get(k) == v for k, v in owner_labels.items()):
                out.append({"sandbox_id": rec["sandbox_id"], "handle": {k: rec[k] for k in ("sandbox_id", "hang_teardown")}})
        return out

    def exec(self, handle, argv, *, env=None, cwd=None, timeout=None, stdin=None, on_output=None):  # type: ignore[no-untyped-def]
        what = argv[0]
        if what == "raise":
            raise RuntimeError("the handler's own bug")
        if what == "hang":
            RELEASE.wait(3600)
        if what == "abort":
            sys.stderr.write("misbehaving: about to abort\n")
            sys.stderr.flush()
            os.abort()
        if what == "exit":
            os._exit(3)
        if what == "garbage":
            from sandboxer.host import worker

            os.write(worker.CURRENT._out_fd, b"this is not json\n")
            time.sleep(5)
        if what == "print":
            print("stray output from the handler")
            sys.stdout.flush()
            return ExecResult(exit_code=0, stdout="printed\n")
        if what == "huge":
            mib = int(argv[1])
            chunk = "x" * (1024 * 1024) if argv[2:] == ["ascii"] else "é" * (512 * 1024)  # 1 MiB of UTF-8
            if on_output is not None:
                for _ in range(mib):
                    on_output("stdout", chunk)
            return ExecResult(exit_code=0, stdout=chunk * mib)
        return ExecResult(exit_code=0, stdout=" ".join(argv) + "\n")


class NeedsSdkExtension(MisbehavingExtension):
    """Needs an SDK that is never installed, from this distribution's extra ``cloud``."""

    requires = ("sandboxer_test_sdk_that_is_not_installed", "cloud")
