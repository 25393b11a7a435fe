"""Start and drive a local backend in its own process (tests, the demo and benchmarks use this).

The backend runs as a real process (``python -m stella_devbackend``,
the same program as ``materializer dev-backend``); this class reads its
ready line and talks to its ``/_dev`` control API with the admin key it
keeps in the data folder. Unless told otherwise the backend behaves like
the real systems: five-minute tokens, no extensions.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from stella_devbackend import forkserver
from stella_devbackend.app import ADMIN_HEADER, SESSION_COOKIE, TOKEN_PATH
from stella_devbackend.auth import SESSION_SECRET_FILE
from stella_devbackend.harness import clean_env

__all__ = ["DevBackend", "DevBackendError"]


class DevBackendError(RuntimeError):
    """The backend process did not start, or a control call failed."""


class DevBackend:
    """A running ``materializer dev-backend`` process."""

    def __init__(self, data_dir: Path, port: int = 0, *, extra_args: list[str] | None = None,
                 token_ttl: float | None = None, extensions: list[str] | None = None,
                 startup_timeout: float = 30.0) -> None:
        """``token_ttl`` None keeps the backend's default (300 s); ``extensions`` names ``--extension`` switches."""
        self.data_dir = Path(data_dir)
        self.port = port
        self.extra_args = list(extra_args or [])
        self.token_ttl = token_ttl
        self.extensions = list(extensions or [])
        self.startup_timeout = startup_timeout
        self.url = ""
        self.token = ""
        self.process: subprocess.Popen[bytes] | None = None
        self._http: httpx.Client | None = None

    @classmethod
    def start(cls, data_dir: Path, port: int = 0, **kwargs: Any) -> DevBackend:
        backend = cls(data_dir, port, **kwargs)
        backend.launch()
        return backend

    def __enter__(self) -> DevBackend:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- process ----------------------------------------------------------------

    def launch(self) -> None:
        """Start the process (on the same port and data folder as before, after a stop)."""
        command = [sys.executable, "-m", "stella_devbackend", "--port", str(self.port),
                   "--data", str(self.data_dir)]
        if self.token_ttl is not None:
            command += ["--token-ttl", str(self.token_ttl)]
        for name in self.extensions:
            command += ["--extension", name]
        command += self.extra_args
        self.process = forkserver.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=clean_env())
        assert self.process.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                self.stop()
                raise DevBackendError(f"dev-backend did not become ready (exit code {self.process.returncode})")
            readable, _, _ = select.select([self.process.stdout], [], [], remaining)
            if readable:
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:
                    continue
                line += chunk
        event = json.loads(line)
        if event.get("event") != "ready":
            raise DevBackendError(f"unexpected first line from dev-backend: {line[:200]!r}")
        self.url, self.token = event["url"], event["token"]
        self.port = int(self.url.rsplit(":", 1)[1])
        self._http = httpx.Client(base_url=self.url, timeout=60.0)

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin-key").read_text()

    @property
    def session_secret_path(self) -> Path:
        """The file holding the dev session secret (what the desktop's Better Auth cookie stands for)."""
        return self.data_dir / SESSION_SECRET_FILE

    @property
    def session_secret(self) -> str:
        return self.session_secret_path.read_text()

    @property
    def token_url(self) -> str:
        """``GET`` here with the session cookie for ``{"token": ...}``, as the desktop app does."""
        return self.url + TOKEN_PATH

    def session_headers(self) -> dict[str, str]:
        """The ``Cookie`` header the desktop sends to the token endpoint: its Better Auth session."""
        return {"Cookie": f"{SESSION_COOKIE}={self.session_secret}"}

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the process (SIGTERM by default; SIGKILL for a crash) and return its exit code."""
        if self._http is not None:
            self._http.close()
            self._http = None
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

    def restart(self) -> None:
        """Stop and start again on the same port with the same data folder."""
        self.stop()
        self.launch()

    # -- control API ------------------------------------------------------------

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        if self._http is None:
            raise DevBackendError("dev-backend is not running")
        response = self._http.request(method, path, json=body, headers={ADMIN_HEADER: self.admin_key})
        if response.status_code >= 400:
            raise DevBackendError(f"{method} {path}: HTTP {response.status_code} {response.text[:300]}")
        return response.json()

    def fetch_token(self) -> str:
        """A fresh token for the signed-in user from ``/api/auth/convex/token``, with the session cookie."""
        if self._http is None:
            raise DevBackendError("dev-backend is not running")
        response = self._http.get(TOKEN_PATH, headers=self.session_headers())
        if response.status_code != 200:
            raise DevBackendError(f"GET {TOKEN_PATH}: HTTP {response.status_code} {response.text[:300]}")
        return response.json()["token"]

    def mint_token(self, sub: str = "demo-user", ttl: float = 3600.0) -> str:
        """A token for another user, or a short-lived (even already expired, ttl < 0) one."""
        return self._call("POST", "/_dev/token", {"sub": sub, "ttl": ttl})["token"]

    def set_faults(self, rules: list[dict[str, Any]] | None = None, **options: Any) -> dict[str, Any]:
        """Replace the fault configuration (see :mod:`stella_devbackend.faults`)."""
        return self._call("POST", "/_dev/faults", {"rules": rules or [], **options})

    def clear_faults(self) -> None:
        self.set_faults([])

    def create_jobs(self, **spec: Any) -> list[str]:
        """Store finished jobs directly; returns their ids (see ``MediaService.build_jobs``)."""
        return self._call("POST", "/_dev/jobs", spec)["jobs"]

    def drop_connections(self) -> int:
        return self._call("POST", "/_dev/drop-connections")["dropped"]

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/_dev/stats")

    def reset(self) -> dict[str, Any]:
        """Empty the running backend for the next test (``POST /_dev/reset``): no jobs, files, faults or sockets.

        Keys, session secret, port and flags stay; :attr:`token` becomes the fresh token the answer carries.
        """
        answer: dict[str, Any] = self._call("POST", "/_dev/reset")
        self.token = answer["token"]
        return answer

    def generate(self, body: dict[str, Any], token: str | None = None) -> httpx.Response:
        """``POST /api/media/v1/generate`` with the demo token (or ``token``); returns the raw response."""
        if self._http is None:
            raise DevBackendError("dev-backend is not running")
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return self._http.post("/api/media/v1/generate", json=body, headers=headers)

    def wait_for_job(self, job_id: str, token: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """Poll ``getByJobId`` until the job has finished (succeeded, failed or unknown); return its document."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = self.query("media_jobs:getByJobId", {"jobId": job_id}, token)
            doc = response.json().get("value") if response.status_code == 200 else None
            if doc is not None and doc["status"] in ("succeeded", "failed", "unknown"):
                return doc
        raise DevBackendError(f"job {job_id} did not finish within {timeout}s")

    def query(self, path: str, args: dict[str, Any], token: str | None = None) -> httpx.Response:
        """``POST /api/query`` as a user; returns the raw response."""
        if self._http is None:
            raise DevBackendError("dev-backend is not running")
        headers = {"Authorization": f"Bearer {token or self.token}"}
        body = {"path": path, "args": [args], "format": "convex_encoded_json"}
        return self._http.post("/api/query", json=body, headers=headers)
