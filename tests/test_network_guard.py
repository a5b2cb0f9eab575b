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
