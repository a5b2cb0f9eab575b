"""The guard in conftest.py: a test that reaches off this machine fails."""

import socket

import pytest

from conftest import NetworkAccessError


def test_non_loopback_connection_is_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(NetworkAccessError):
            sock.connect(("192.0.2.1", 80))  # TEST-NET-1: never routable


def test_loopback_is_allowed():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.socket() as client:
            client.connect(server.getsockname())


def test_subprocesses_are_guarded_too():
    """Tests start dvc, `coalora run` and Prefect's server as subprocesses: the guard reaches them through
    PYTHONPATH (tests/offline/sitecustomize.py), while loopback still works there."""
    import subprocess
    import sys

    code = ("import socket\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1)\n"
            "socket.create_connection(s.getsockname()).close()\n"
            "socket.socket().connect(('192.0.2.1', 80))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "NetworkAccessError: test tried to open a network connection to ('192.0.2.1', 80)" in done.stderr
