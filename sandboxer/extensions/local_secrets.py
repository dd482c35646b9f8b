"""ext.local's secrets: held in the sandbox's init process's environment, and nowhere else.

The manager hands a provision the values (``ProvisionRequest.secrets``); ext.local starts the
init with them in its environment and records only their *names* in the handle. An exec (in
this process or in another one later, the CLI's, which never had the values: they are not in
state) reads them back from ``/proc/<init pid>/environ``, after checking the pid is still that
init (its start time), and gives them to the command. So the workspace, its snapshots, the
handle and the extension's ``.meta`` files never hold a value.

Who can read them: the sandbox's own processes (it is their environment), and on the host root
and, without root, this user (whose sandboxes share its uid). Another sandbox cannot: with root
each sandbox has its own uid, and in any case its own pid namespace, so it sees no other
sandbox's /proc.
"""

from __future__ import annotations

from typing import Iterable

from sandboxer.errors import ExecError


def init_secrets(backend: str, sandbox_id: str, pid: int | None, names: Iterable[str]) -> dict[str, str]:
    """The secrets ``names`` from the environment the sandbox's init ``pid`` started with.

    Raises:
        ExecError: the init's environment cannot be read, or lacks a name (it is not that init).
    """
    names = list(names)
    if not names:
        return {}
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ExecError(f"{backend}: cannot read the secrets of sandbox {sandbox_id} from its init process "
                        f"{pid}: {exc.strerror}", backend=backend) from None
    env = dict(kv.split(b"=", 1) for kv in raw.split(b"\0") if b"=" in kv)
    out = {}
    for name in names:
        value = env.get(name.encode())
        if value is None:
            raise ExecError(f"{backend}: sandbox {sandbox_id}'s init process {pid} does not hold secret "
                            f"{name!r}; recreate the sandbox", backend=backend)
        out[name] = value.decode("utf-8", "surrogateescape")
    return out
