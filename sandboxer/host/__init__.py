"""Out-of-process extensions: the NDJSON protocol, the worker that serves one extension, and the
client proxy the manager calls (see docs/extension-host.md).

``protocol`` owns the wire format, ``worker`` the process that runs a handler, ``client`` the
:class:`~sandboxer.extensions.base.SandboxExtension` proxy that starts, watches and restarts it.
"""

from sandboxer.host.protocol import ABI_VERSION

__all__ = ["ABI_VERSION"]
