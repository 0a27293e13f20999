"""`langadapt serve` on the embedded defaults in a subprocess (SQLite, a local artifact folder, a SQLite broker,
the workers it starts): the service exactly as a user runs it, for tests of its clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.s3_server import free_port

LANGADAPT = str(Path(sys.executable).with_name("langadapt"))


class EmbeddedService:
    def __init__(self, home: Path, model_root: Path, **env: str) -> None:
        self.home = home
        self.env = {
            **os.environ,
            "LANGADAPT_HOME": str(home / "data"),
            "LANGADAPT_ALLOWED_MODEL_ROOTS": json.dumps([str(model_root)]),
            "LANGADAPT_HEARTBEAT_INTERVAL_S": "0.5",
            "LANGADAPT_WORKER_BEAT_INTERVAL_S": "0.5",  # /readyz waits for a GPU worker's heartbeat
            **env,
        }
        for name in ("LANGADAPT_DATABASE_URL", "LANGADAPT_BROKER_URL", "LANGADAPT_STORAGE_URL"):
            self.env.pop(name, None)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "serve.log"

    def __enter__(self) -> EmbeddedService:
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [LANGADAPT, "serve", "--port", str(self.port)],
            env=self.env,
            cwd=self.home,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/readyz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.__exit__()
                raise RuntimeError(f"langadapt serve did not start:\n{self.log()}")
            time.sleep(0.2)

    def __exit__(self, *_: object) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def admin(self, *args: str) -> dict:
        """`langadapt admin ...` on this service's data folder; its JSON answer."""
        done = subprocess.run([LANGADAPT, "admin", *args], env=self.env, capture_output=True, text=True)
        assert done.returncode == 0, f"langadapt admin {' '.join(args)}: {done.stderr}"
        return json.loads(done.stdout)

    def new_key(self, team: str) -> str:
        return self.admin("create-team", team)["api_key"]

    def worker_pids(self) -> list[int]:
        return json.loads(self.log_path.read_text().splitlines()[0])["worker_pids"]
