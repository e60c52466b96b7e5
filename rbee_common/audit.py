"""The audit trail: who did what, tamper-evident (SCENARIOS area 330, DESIGN §8).

One JSON object per line under the daemon's state dir (`audit/queen.jsonl`,
`audit/hive-<id>.jsonl`). Each entry carries the SHA-256 of the one before it
(`previous_hash`; the first of a chain has 64 zeros) and its own `entry_hash`,
the SHA-256 of `previous_hash` and its canonical JSON without `entry_hash`.
Lines are written in canonical form (sorted keys, no spaces, ASCII), so a
one-byte edit anywhere breaks either the JSON, the canonical form or a hash,
and `verify` names the first line that no longer holds.

The chain continues across restarts and rotation: every write takes an
exclusive lock, reads the hash of the last line, and appends one line, so two
processes on one file still make one chain. At `max_bytes` the file is moved
to `<name>-<UTC time>.jsonl` and the next entry continues from its last hash.

Never a secret or a prompt: actors are token fingerprints, details are ids,
model references and outcomes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("rbee.audit")

GENESIS = "0" * 64
MAX_BYTES = 10 * 1024 * 1024
_TAIL_BYTES = 64 * 1024


def canonical(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "entry_hash"}
    return hashlib.sha256((body["previous_hash"] + canonical(body)).encode()).hexdigest()


def _clip(value: Any) -> Any:
    """Client-supplied strings are kept short; JSON escapes their control characters."""
    if isinstance(value, str):
        return value[:200]
    if isinstance(value, dict):
        return {str(k)[:64]: _clip(v) for k, v in list(value.items())[:32]}
    if isinstance(value, list | tuple):
        return [_clip(v) for v in list(value)[:32]]
    return value if isinstance(value, int | float | bool) or value is None else str(value)[:200]


class AuditLog:
    def __init__(self, path: Path, *, component: str, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.component = component
        self.max_bytes = max_bytes
        self._disk_warned = 0.0

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold `.<name>.lock` beside the log: one writer at a time, across processes."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = os.open(self.path.with_name(f".{self.path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held for one short write; never across an await
            yield
        finally:
            os.close(lock)  # releases the lock

    def record(
        self, event_type: str, *, actor: str, outcome: str, correlation_id: str | None = None,
        **details: Any,
    ) -> None:
        """Append one entry. A full or read-only disk is logged, never raised into a request."""
        try:
            with self._locked():
                previous, seq = self._tail()
                if self.path.exists() and self.path.stat().st_size >= self.max_bytes:
                    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
                    archive = self.path.with_name(f"{self.path.stem}-{stamp}{self.path.suffix}")
                    os.replace(self.path, archive)  # the next entry starts the new file, chained to it
                    log.info("audit log rotated: %s", archive.name)
                    previous, seq = self._append(previous, seq, "audit.rotate", "system", "ok", None,
                                                 {"archive": archive.name})
                self._append(previous, seq, event_type, actor, outcome, correlation_id, details)
        except OSError as error:
            log.error("audit entry %s not written: %s", event_type, error.strerror)
            return
        self._check_disk()

    def _tail(self) -> tuple[str, int]:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return GENESIS, 0
        try:
            return _last(fd)
        finally:
            os.close(fd)

    def _append(
        self, previous: str, seq: int, event_type: str, actor: str, outcome: str, correlation_id: str | None,
        details: dict[str, Any],
    ) -> tuple[str, int]:
        entry: dict[str, Any] = {
            "seq": seq + 1,
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "component": self.component, "event_type": event_type, "actor": _clip(actor),
            "outcome": outcome, "correlation_id": correlation_id, "details": _clip(details),
            "previous_hash": previous,
        }
        entry["entry_hash"] = entry_hash(entry)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (canonical(entry) + "\n").encode())  # one write: a reader never sees half a line
        finally:
            os.close(fd)
        return entry["entry_hash"], entry["seq"]

    def _check_disk(self) -> None:
        now = time.monotonic()
        if now - self._disk_warned < 60:
            return
        usage = shutil.disk_usage(self.path.parent)
        used = 1 - usage.free / usage.total if usage.total else 0.0
        if used >= 0.99:
            self._disk_warned = now
            log.error("audit log disk is %.0f%% full: the next entries may not be written; free space now",
                      used * 100)
        elif used >= 0.95:
            self._disk_warned = now
            log.warning("audit log disk is %.0f%% full; free space so that auditing can go on", used * 100)


def _last(fd: int) -> tuple[str, int]:
    """(entry_hash, seq) of the file's last entry; GENESIS and 0 for an empty file."""
    size = os.fstat(fd).st_size
    if size == 0:
        return GENESIS, 0
    start = max(0, size - _TAIL_BYTES)
    tail = os.pread(fd, size - start, start)
    lines = tail.rstrip(b"\n").split(b"\n")
    try:
        last = json.loads(lines[-1])
        return str(last["entry_hash"]), int(last["seq"])
    except (ValueError, KeyError, TypeError):
        # A torn last line (a crash mid-write): chain from it anyway, so `verify` points at it.
        return hashlib.sha256(lines[-1]).hexdigest(), 0


class Broken(Exception):
    def __init__(self, file: Path, line: int, why: str) -> None:
        super().__init__(f"{file}: line {line}: {why}")
        self.file, self.line, self.why = file, line, why


def chain_files(path: Path) -> list[Path]:
    """The archives of `path` (oldest first), then `path` itself."""
    archives = sorted(path.parent.glob(f"{re.escape(path.stem)}-*{path.suffix}"))
    archives = [a for a in archives if re.fullmatch(rf"{re.escape(path.stem)}-\d{{8}}T\d+Z", a.stem)]
    return [*archives, *([path] if path.exists() else [])]


def verify(files: list[Path]) -> int:
    """Check one chain across `files` in order; the number of entries, or `Broken` at the first bad line."""
    previous: str | None = None
    count = 0
    for file in files:
        with open(file, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.endswith(b"\n"):
                    raise Broken(file, number, "the line is cut short")
                text = raw[:-1].decode("ascii", errors="replace")
                try:
                    entry = json.loads(text)
                except ValueError:
                    raise Broken(file, number, "not valid JSON") from None
                if not isinstance(entry, dict) or canonical(entry) != text:
                    raise Broken(file, number, "edited (not as it was written)")
                if not isinstance(entry.get("previous_hash"), str) or "seq" not in entry:
                    raise Broken(file, number, "it lacks its chain fields")
                if entry.get("entry_hash") != entry_hash(entry):
                    raise Broken(file, number, "its hash does not match its content")
                # The first entry of the first file may continue a chain archived elsewhere.
                if previous is not None and entry.get("previous_hash") != previous:
                    raise Broken(file, number, "it does not follow the entry before it")
                previous = str(entry["entry_hash"])
                count += 1
    return count


AUDITED_OPERATIONS = {
    "hive_install": "hive.install", "hive_uninstall": "hive.uninstall", "hive_start": "hive.start",
    "hive_stop": "hive.stop", "worker_spawn": "worker.spawn", "worker_stop": "worker.stop",
    "model_download": "model.download", "model_delete": "model.delete",
}
"""Job operations that change the fleet, and their audit event types."""


def operation_details(operation: Any, result: Any) -> dict[str, Any]:
    """What an audited job is about: ids and model references, never a token or a prompt."""
    details = {k: getattr(operation, k) for k in ("hive_id", "worker_id", "model", "device")
               if isinstance(getattr(operation, k, None), str)}
    if isinstance(result, dict) and isinstance(result.get("worker_id"), str):
        details["worker_id"] = result["worker_id"]
    elif hasattr(result, "worker_id") and isinstance(result.worker_id, str):
        details["worker_id"] = result.worker_id
    return details


def record_job(audit: AuditLog, job: Any) -> None:
    """A finished job, if its operation changes the fleet (`JobServer.on_finish`)."""
    event = AUDITED_OPERATIONS.get(job.operation.name)
    if event is None:
        return
    error = job.error
    audit.record(
        event, actor=job.actor, outcome=job.state,
        correlation_id=error.correlation_id if error is not None else job.id,
        job_id=job.id, **({"error": error.code} if error is not None else {}),
        **operation_details(job.operation, job.result),
    )
