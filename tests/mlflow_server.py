"""A real ``mlflow server`` on localhost for tests: start it, crash it (SIGKILL), start it again;
or, where a test needs outages but not a crash of the server itself, an ``OutageProxy`` in front
of one server shared by the session (a start costs seconds of imports on each of 2 processes)."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional, Set


def start_server(port: int, workdir: Path, timeout_s: float = 90) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port with a SQL (sqlite) backend store and a served artifact
    store; the same files under ``workdir`` on every start, so a restart keeps what was logged."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{workdir / 'server.db'}",
         "--serve-artifacts", "--artifacts-destination", str(workdir / "artifacts")],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=open(workdir / "server.log", "ab"),
        start_new_session=True,  # its own process group: uvicorn (and any job consumers) die together
        # No job runner: MLflow 3 starts eight huey consumers by default (GenAI jobs, unused here)
        # that double the server's CPU time (18 s against 9 s in its first 30 s, measured) while
        # training runs beside it on the test machine's 2 cores. The tracking API is the same.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(workdir / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    kill_server(proc)
    raise RuntimeError(f"mlflow server did not come up in {timeout_s} s")


def kill_server(proc: subprocess.Popen) -> None:
    """SIGKILL the server's process group: a crash, not a clean shutdown."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


class OutageProxy:
    """A TCP relay on its own localhost port in front of a running server. ``cut()`` closes the
    port and resets every open connection: a client sees what it sees when the server is killed
    (connection refused, a reset mid-request); ``restore()`` listens on the same port again, and
    the server behind it has kept everything. Starts cut."""

    def __init__(self, target_port: int, port: Optional[int] = None) -> None:
        from mod_train.distributed.world import free_port

        self.target = ("127.0.0.1", target_port)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._conns: Set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: Optional[socket.socket] = None

    def restore(self) -> None:
        assert self._listener is None, "already up"
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)  # accept() polls: closing a socket does not wake a blocked accept
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # closed by cut()
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._conns |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):  # the other direction's recv returns too
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            self._conns.discard(src)
        src.close()
