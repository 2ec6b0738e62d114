"""The suite itself guarantees that no test reaches the network."""

import socket

import pytest
from conftest import NetworkAccessError


def test_outbound_connection_is_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        with pytest.raises(NetworkAccessError):
            s.connect(("93.184.216.34", 443))


def test_dns_lookup_is_refused():
    with pytest.raises(NetworkAccessError):
        socket.getaddrinfo("huggingface.co", 443)


def test_loopback_is_allowed():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as c:
            c.connect(srv.getsockname())
