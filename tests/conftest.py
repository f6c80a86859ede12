"""Shared fixtures. Prepares the offline environment before any test imports ultralytics."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.env import prepare_environment  # noqa: E402

prepare_environment()

# Tests run tiny tensors: one intra-op thread avoids OpenMP contention on the 2-core machines (5-50x slowdowns
# seen when other jobs run), and subprocesses started by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

TINY_CLASSES = ("circle", "square", "triangle")


def _is_local(host) -> bool:
    """Loopback names/addresses and unix sockets are allowed; everything else counts as outbound."""
    if host in (None, "", "localhost", "localhost.localdomain"):
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


class NetworkGuard:
    """Blocks and records outbound connections and name lookups; loopback passes through."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_connect = socket.socket.connect
        real_connect_ex = socket.socket.connect_ex
        real_sendto = socket.socket.sendto
        real_getaddrinfo = socket.getaddrinfo
        real_create_connection = socket.create_connection
        guard = self

        def host_of(sock, address):
            if sock.family == getattr(socket, "AF_UNIX", None):
                return None
            return address[0] if isinstance(address, tuple) else address

        def connect(sock, address):
            guard._check(host_of(sock, address), f"connect {address!r}")
            return real_connect(sock, address)

        def connect_ex(sock, address):
            guard._check(host_of(sock, address), f"connect_ex {address!r}")
            return real_connect_ex(sock, address)

        def sendto(sock, data, *args):
            address = args[-1]
            guard._check(host_of(sock, address), f"sendto {address!r}")
            return real_sendto(sock, data, *args)

        def getaddrinfo(host, *args, **kwargs):
            guard._check(host, f"getaddrinfo {host!r}", lookup=True)
            return real_getaddrinfo(host, *args, **kwargs)

        def create_connection(address, *args, **kwargs):
            guard._check(address[0], f"create_connection {address!r}")
            return real_create_connection(address, *args, **kwargs)

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
        monkeypatch.setattr(socket.socket, "sendto", sendto)
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(socket, "create_connection", create_connection)

    def _check(self, host, what: str, lookup: bool = False) -> None:
        if _is_local(host):
            return
        self.attempts.append(what)
        if lookup:
            raise socket.gaierror(socket.EAI_NONAME, f"blocked by socket_guard: {what}")
        raise ConnectionRefusedError(f"blocked by socket_guard: {what}")

    def assert_no_attempts(self) -> None:
        """Fail listing every outbound attempt, even ones the code under test caught and ignored."""
        if self.attempts:
            listed = "\n  ".join(self.attempts)
            raise AssertionError(f"{len(self.attempts)} outbound network attempt(s):\n  {listed}")


@pytest.fixture
def socket_guard(monkeypatch: pytest.MonkeyPatch):
    """Block outbound network for one test and fail it if anything tried to connect."""
    guard = NetworkGuard()
    guard.install(monkeypatch)
    yield guard
    guard.assert_no_attempts()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data.yaml of a synthetic set: 8 train / 4 val images of 64 px, classes circle/square/triangle."""
    from src.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("tiny_shapes")
    return generate_dataset(root, n_train=8, n_val=4, imgsz=64, seed=0, classes=TINY_CLASSES, progress=False)


@pytest.fixture
def tiny_model_yaml() -> str:
    """A packaged model config for random-init models."""
    return "yolov8n.yaml"
