"""Secrets and signed URLs (issue 13, part 7): what the materializer keeps and sends holds no token, no signature.

Checked where it lands: the bytes of the real SQLite files (database, ``-wal``, ``-shm``), the lines a
``materializer watch`` process prints, ``gallery.json``; and ``materializer query`` as a process
reading its token from a file or stdin.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from materializer import exits
from materializer.layout import default_layout
from materializer.ledger import Ledger, OutputFile
from materializer.redaction import REDACTED, register_secret
from stella_devbackend import forkserver
from stella_devbackend.control import DevBackend
from stella_devbackend.harness import DaemonProcess, clean_env

from helpers import gallery, ledger_jobs, output_files, wait_until
from hostile_server import Frame, HostileConvex, SocketState

SIGNED = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20260101%2Fus-east-1&X-Amz-Signature=" \
         "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef&X-Amz-Expires=3600"


def ledger_bytes(db: Path) -> bytes:
    """Everything SQLite keeps on disk for the ledger at ``db``: the database and its -wal and -shm, if any."""
    return b"".join(path.read_bytes() for path in sorted(db.parent.glob(db.name + "*")) if path.is_file())


def png(color: str = "red") -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "PNG")
    return buffer.getvalue()


def one_file(index: int = 0) -> list[OutputFile]:
    return [OutputFile(index, f"j_{index}.png", "image/png", 8, 8, 10, "0" * 64)]


class Lines:
    """Lines of a process's stdout, each waited for with a deadline."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        self.fd, self.buffer = process.stdout.fileno(), b""

    def until(self, wanted: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> list[str]:
        """Every line up to and including the first JSON line ``wanted`` accepts."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            while b"\n" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\n", 1)
                seen.append(raw.decode())
                if wanted(json.loads(raw)):
                    return seen
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no wanted line within {timeout}s; got {seen}")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError(f"the stream ended; got {seen}")
            self.buffer += chunk


def watch_until(root: Path, wanted: Callable[[dict[str, Any]], bool]) -> list[str]:
    """``materializer watch --since 0 --json`` as a process, read until a line ``wanted`` accepts."""
    watcher = forkserver.Popen([sys.executable, "-m", "materializer", "watch", "--json", "--since", "0", "--root",
                                str(root)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=clean_env(XDG_CONFIG_HOME=str(root.parent / "watch.config")))
    try:
        return Lines(watcher).until(wanted)
    finally:
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=15) == 0


# -- the ledger on its own ---------------------------------------------------------------------------------


def test_a_finished_job_keeps_no_signed_url_query(tmp_path: Path) -> None:
    db = tmp_path / "materializer.db"
    url = f"https://cdn.example/a/b.png?{SIGNED}"
    doc: dict[str, Any] = {"jobId": "j", "status": "succeeded", "completedAt": 1.0, "capability": "text_to_image",
           "request": {"prompt": f"as seen on {url} yesterday", "source": {"url": f"https://cdn.example/in.png#{SIGNED}"}},
           "output": {"images": [{"url": url, "content_type": "image/png"}], "video": {"url": "http://v.example/v?t=1"},
                      "text": "?not a url"}}
    with Ledger(db) as ledger:
        ledger.observe_jobs([doc])
        assert ledger.job("j").doc == doc  # type: ignore[union-attr]  # pending: what the download needs, verbatim
        ledger.mark_materialized("j", one_file(), {"jobId": "j"})
        kept = ledger.job("j").doc  # type: ignore[union-attr]
        ledger.observe_jobs([doc])  # seen again in a later answer: the record stays as it is
        assert ledger.job("j").doc == kept  # type: ignore[union-attr]
    assert kept["output"] == {"images": [{"url": "https://cdn.example/a/b.png", "content_type": "image/png"}],
                              "video": {"url": "http://v.example/v"}, "text": "?not a url"}
    # A prompt that quotes a URL as text is the person's text, and it stays.
    assert kept["request"] == {"prompt": f"as seen on {url} yesterday", "source": {"url": "https://cdn.example/in.png"}}
    # Without such a prompt: nothing left in the files, the old row's bytes included (secure_delete).
    doc["request"]["prompt"] = "plain"
    db.unlink()
    with Ledger(db) as ledger:
        ledger.observe_jobs([doc])
        assert b"X-Amz-Signature" in ledger_bytes(db)  # while pending, it is there (and needed)
        ledger.mark_materialized("j", one_file(), {"jobId": "j"})
        ledger.note_failed_job({"jobId": "f", "status": "failed", "output": {"images": [{"url": url}]}},
                               {"jobId": "f", "status": "failed"})
    stored = ledger_bytes(db)
    assert b"X-Amz-Signature" not in stored and b"X-Amz-Credential" not in stored and b"AKIAEXAMPLE" not in stored


def test_a_token_in_server_text_is_stored_nowhere(tmp_path: Path) -> None:
    token = f"opaque-session-{secrets.token_hex(16)}"
    register_secret(token)  # as every token source does with what it hands out
    db = tmp_path / "materializer.db"
    quoted = f"Could not verify token {token}: bad signature"
    with Ledger(db) as ledger:
        ledger.append_event("materializer.state", {"state": "auth_required", "detail": quoted, "nested": [quoted]})
        ledger.set_state("connection", {"state": "auth_required", "detail": quoted})
        ledger.observe_jobs([{"jobId": "a", "completedAt": 1.0, "request": {"prompt": f"echo {token}"}},
                             {"jobId": "b", "completedAt": 2.0}, {"jobId": "c", "completedAt": 3.0}])
        ledger.mark_materialized("a", one_file(), {"jobId": "a", "prompt": f"echo {token}"}, missing=[quoted])
        ledger.record_failure("b", quoted, 0.0, owner="me")
        ledger.quarantine("c", quoted)
        ledger.note_failed_job({"jobId": "f", "error": {"message": quoted}}, {"jobId": "f", "message": quoted})
        events = ledger.events_after(0, 10).events
        [entry] = ledger.gallery_entries(10)
    assert all(token not in json.dumps(event.payload) for event in events)
    assert f"Could not verify token {REDACTED}: bad signature" in json.dumps(events[0].payload)
    assert entry.prompt == f"echo {REDACTED}"
    assert token.encode() not in ledger_bytes(db)


# -- the daemon, as a process ---------------------------------------------------------------------------------


def test_signed_output_urls_are_gone_from_the_ledger_once_materialized(backend: DevBackend, tmp_path: Path) -> None:
    data = png("blue")
    (backend.data_dir / "files" / "signed.png").write_bytes(data)
    root = tmp_path / "root"
    with DaemonProcess(root, backend):
        [job] = backend.create_jobs(doc={"output": {"images": [{"url": f"{backend.url}/files/signed.png?{SIGNED}",
                                                                "content_type": "image/png"}]}})
        wait_until(lambda: ledger_jobs(root).get(job) == "materialized", what="the signed job materialized")
    assert output_files(root) == [f"{job}_0.png"]
    assert (default_layout(root).outputs / f"{job}_0.png").read_bytes() == data
    stored = ledger_bytes(default_layout(root).ledger)
    assert b"X-Amz-Signature" not in stored and b"X-Amz-Credential" not in stored
    assert f"{backend.url}/files/signed.png".encode() in stored  # the record of where it came from stays


def test_a_token_quoted_in_an_auth_error_reaches_neither_ledger_nor_sidebar(tmp_path: Path) -> None:
    token = f"opaque-session-{secrets.token_hex(16)}"

    @dataclass(frozen=True)
    class Endpoint:
        url: str
        token: str

    def refuse(state: SocketState) -> list[Frame]:
        return [json.dumps({"type": "AuthError", "error": f"Could not verify token {token}: bad signature",
                            "baseVersion": state.identity, "authUpdateAttempted": True})]

    root = tmp_path / "root"
    with HostileConvex(script=refuse, hostile_sockets=1000) as server, DaemonProcess(root, Endpoint(server.url, token)):
        lines = watch_until(root, lambda event: event.get("payload", {}).get("state") == "auth_required")
        status = forkserver.run([sys.executable, "-m", "materializer", "status", "--json", "--root", str(root)],
                                capture_output=True, text=True, timeout=60,
                                env=clean_env(XDG_CONFIG_HOME="/nonexistent"))
    refused = json.loads(lines[-1])["payload"]
    assert refused["detail"] == f"the server refused the token: Could not verify token {REDACTED}: bad signature"
    assert all(token not in line for line in lines)
    assert token not in status.stdout and json.loads(status.stdout)["connection"] == "auth_required"
    assert token.encode() not in ledger_bytes(default_layout(root).ledger)
    assert token not in (tmp_path / "root.log").read_text()


def test_a_token_in_a_prompt_or_a_failure_message_reaches_no_sink(backend: DevBackend, tmp_path: Path) -> None:
    """The backend's own token (a JWT the daemon reads from its token file), quoted by jobs' texts."""
    root = tmp_path / "root"
    with DaemonProcess(root, backend):
        [job] = backend.create_jobs(prompt=f"a cat holding a sign that says {backend.token}")
        [failed] = backend.create_jobs(status="failed", message=f"provider refused {backend.token}")
        seen: set[str] = set()

        def both_announced(event: dict[str, Any]) -> bool:
            seen.add(event.get("type", ""))
            return {"media.failed", "media.materialized"} <= seen

        lines = watch_until(root, both_announced)
        manifest = default_layout(root).outputs / "gallery.json"
        wait_until(lambda: manifest.exists() and gallery(root)["jobs"], what="the job in the gallery")
    events = [json.loads(line) for line in lines]
    [announced] = [e["payload"] for e in events if e.get("type") == "media.materialized"]
    assert announced["jobId"] == job and announced["prompt"] == f"a cat holding a sign that says {REDACTED}"
    [noted] = [e["payload"] for e in events if e.get("type") == "media.failed"]
    assert noted["jobId"] == failed and backend.token not in json.dumps(noted)
    assert all(backend.token not in line for line in lines)
    assert gallery(root)["jobs"][0]["prompt"] == f"a cat holding a sign that says {REDACTED}"
    assert backend.token not in manifest.read_text()
    assert backend.token.encode() not in ledger_bytes(default_layout(root).ledger)


# -- `materializer query` and its token ------------------------------------------------------------------------

LIST = "media_jobs:listSucceededSince"


def query(backend: DevBackend, *token_args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return forkserver.run([sys.executable, "-m", "materializer", "query", LIST, '{"since": 0}', "--url", backend.url,
                           *token_args], input=stdin, capture_output=True, text=True, timeout=60,
                          env=clean_env(XDG_CONFIG_HOME="/nonexistent"))


def test_query_reads_its_token_from_stdin_or_a_file_and_warns_about_argv(backend: DevBackend, tmp_path: Path) -> None:
    [job] = backend.create_jobs()
    token_file = tmp_path / "token"
    token_file.write_text(backend.token + "\n")
    warning = ("materializer query: warning: --token puts the token on the command line, where other users of this "
               "machine can read it (ps, /proc/<pid>/cmdline); use --token-file FILE or --token-stdin\n")
    for result, stderr in ((query(backend, "--token-stdin", stdin=backend.token + "\n"), ""),
                           (query(backend, "--token-file", str(token_file)), ""),
                           (query(backend, "--token", backend.token), warning)):
        assert (result.returncode, result.stderr) == (exits.OK, stderr)
        [line] = result.stdout.splitlines()
        assert [doc["jobId"] for doc in json.loads(line)] == [job]
    empty = query(backend, "--token-stdin", stdin="")
    assert (empty.returncode, empty.stdout) == (exits.SIGN_IN_NEEDED, "")
    assert empty.stderr == "materializer query: no token: the given token is empty\n"
    refused = query(backend, "--token-stdin", stdin="not-the-token\n")
    assert refused.returncode == exits.SIGN_IN_NEEDED and "refused the token (HTTP 401)" in refused.stderr
    both = query(backend, "--token-stdin", "--token-file", str(token_file))
    assert both.returncode == exits.USAGE and "not allowed with argument" in both.stderr
