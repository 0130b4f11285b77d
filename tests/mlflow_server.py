"""A real ``mlflow server`` on localhost for tests: start it, crash it (SIGKILL), start it again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def start_server(port: int, workdir: Path, timeout_s: float = 90) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port with a SQL (sqlite) backend store and a served artifact
    store; the same files under ``workdir`` on every start, so a restart keeps what was logged."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{workdir / 'server.db'}",
         "--serve-artifacts", "--artifacts-destination", str(workdir / "artifacts")],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=open(workdir / "server.log", "ab"),
        start_new_session=True,  # its own process group: uvicorn and the job consumers die together
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
