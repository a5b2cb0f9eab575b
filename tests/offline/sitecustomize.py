"""The tests' offline guard, in every Python process they start.

conftest.py imports this module, and puts its folder first on PYTHONPATH, so that the subprocesses tests
start (``coalora run``, ``dvc``, Prefect's temporary API server, anything they start in turn) import it too,
at start-up, as ``sitecustomize``. Any connection to a host that is not this machine then raises
:class:`NetworkAccessError`, in the test process and in its subprocesses alike.

Off unless ``COALORA_TEST_OFFLINE=1`` (conftest sets it), so a shell that inherits the PYTHONPATH is unchanged.
"""

from __future__ import annotations

import ipaddress
import os
import socket

ENV = "COALORA_TEST_OFFLINE"


class NetworkAccessError(RuntimeError):
    """A test (or a process it started) tried to reach a host that is not on this machine."""


def _is_local(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: resolving it would already be network access


def install() -> None:
    """Replace ``socket.socket.connect``/``connect_ex`` with versions that refuse non-loopback addresses."""
    if getattr(socket.socket.connect, "_offline_guard", False):
        return
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self, address):
        if not _is_local(address):
            raise NetworkAccessError(f"test tried to open a network connection to {address!r} (pid {os.getpid()})")
        return real_connect(self, address)

    def connect_ex(self, address):
        if not _is_local(address):
            raise NetworkAccessError(f"test tried to open a network connection to {address!r} (pid {os.getpid()})")
        return real_connect_ex(self, address)

    connect._offline_guard = connect_ex._offline_guard = True
    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex


if os.environ.get(ENV) == "1":
    install()
