"""``materializer status``: what the daemon is doing, read from the ledger (works with it stopped)."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any, TextIO

from materializer.layout import InstanceLock, Layout, UntrustedPath, inspect_layout
from materializer.ledger import Ledger, LedgerError

__all__ = ["collect_status", "print_status"]


def collect_status(root: Path, layout: Layout) -> dict[str, Any]:
    """The status as one JSON-ready object."""
    pid = InstanceLock.holder(layout)
    report: dict[str, Any] = {"root": str(root), "stateDir": str(layout.state), "running": pid is not None,
                              "pid": pid if pid and pid > 0 else None}
    # What `run` would refuse (or tighten), so that a refused start is explained here too.
    report["untrusted"] = [{"path": str(finding.path), "problem": finding.problem, "fix": finding.fix}
                           for finding in inspect_layout(layout, root)]
    path = layout.ledger
    if not path.exists():
        report["ledger"] = None
        return report
    try:
        with Ledger(path, create=False) as ledger:
            status = ledger.status()
    except (LedgerError, UntrustedPath) as exc:
        report["ledger"] = {"error": str(exc)}
        return report
    connection = status.state.get("connection") or {}
    report.update(
        connection=connection.get("state") if report["running"] else "stopped",
        connectionSince=connection.get("at"),
        action=connection.get("action") if report["running"] else None,
        detail=connection.get("detail") if report["running"] else None,
        cursor={"succeeded": status.cursors.get("succeeded"), "failed": status.cursors.get("failed")},
        counts=status.counts,
        backlog=status.backlog,
        failedJobsNoted=status.failed_jobs_noted,
        lastEvent=None if status.last_event is None else {
            "seq": status.last_event.seq, "type": status.last_event.type, "at": status.last_event.created_at,
            "jobId": status.last_event.payload.get("jobId"),
        },
        quarantined=[{"jobId": q.job_id, "reason": q.reason, "attempts": q.attempts} for q in status.quarantined],
        gaps=status.state.get("gaps") or [],
        outputs=str(layout.outputs),
        ledger={"path": str(path), "schemaVersion": status.schema_version, "bytes": os.path.getsize(path)},
    )
    return report


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return dt.datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def _when_ms(ms: float | None) -> str:
    return "not set" if ms is None else _when(ms / 1000)


def print_status(report: dict[str, Any], as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(json.dumps(report) + "\n")
        return
    running = f"running (pid {report['pid']})" if report["running"] else "not running"
    out.write(f"daemon:      {running}\nroot:        {report['root']}\n")
    for item in report["untrusted"]:
        out.write(f"untrusted:   {item['path']} {item['problem']}; {item['fix']}\n")
    if report.get("ledger") is None:
        out.write("ledger:      none yet (the daemon has never run for this root)\n")
        return
    if "error" in report["ledger"]:
        out.write(f"ledger:      unreadable: {report['ledger']['error']}\n")
        return
    out.write(f"connection:  {report['connection']} (since {_when(report['connectionSince'])})\n")
    if report.get("detail"):
        out.write(f"why:         {report['detail']}\n")
    if report.get("action"):
        out.write(f"sign-in:     {report['action']}\n")
    counts = report["counts"]
    out.write(f"cursor:      {_when_ms(report['cursor']['succeeded'])}\n")
    out.write(f"jobs:        {counts.get('materialized', 0)} materialized, {report['backlog']} waiting, "
              f"{counts.get('quarantined', 0)} given up; {report['failedJobsNoted']} upstream failures noted\n")
    last = report["lastEvent"]
    out.write("last event:  " + ("none" if last is None else
                                 f"#{last['seq']} {last['type']} {last['jobId'] or ''} at {_when(last['at'])}") + "\n")
    for gap in report["gaps"]:
        out.write(f"  not covered: jobs completed from {_when_ms(gap['fromMs'])} until {_when_ms(gap['untilMs'])} "
                  f"may be missing (at least {gap['jobsAtLeast']} jobs completed since then; {gap['reason']})\n")
    for item in report["quarantined"]:
        out.write(f"  given up {item['jobId']} after {item['attempts']} attempt(s): {item['reason']}\n")
