"""A throwaway S3 endpoint for tests: moto's server in a subprocess, so the S3 code talks real HTTP."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

_START_TIMEOUT_S = 20.0
# Tests talk to 127.0.0.1 directly: a proxy from the environment must not intercept the readiness probe.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A port that was free a moment ago (also handy as a closed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        _NO_PROXY.open(url, timeout=0.5).close()
    except urllib.error.HTTPError:
        return True  # any HTTP status means the server is up
    except OSError:
        return False
    return True


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """Run `moto_server` on a free local port; yield its endpoint "127.0.0.1:PORT"."""
    server = os.path.join(os.path.dirname(sys.executable), "moto_server")
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + _START_TIMEOUT_S
            while not _answers(f"http://127.0.0.1:{port}/"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    output = log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"moto_server did not start on port {port} (exit {proc.poll()}):\n{output}")
                time.sleep(0.1)
            yield f"127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
