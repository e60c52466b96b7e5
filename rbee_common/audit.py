"""The audit trail: who did what, tamper-evident (SCENARIOS area 330, DESIGN §8).

One JSON object per line under the daemon's state dir (`audit/queen.jsonl`,
`audit/hive-<id>.jsonl`). Each entry carries the `entry_hash` of the one
before it (`previous_hash`; the first of a chain has 64 zeros) and its own:
an HMAC-SHA256, under a key kept outside the log (`audit.key` in the config
dir, mode 0600, made on first use), of `previous_hash` and its canonical JSON
without `entry_hash`. Lines are canonical (sorted keys, no spaces, ASCII), so
a one-byte edit anywhere breaks the JSON, the canonical form or a MAC, and
without the key nobody can recompute the chain after an edit or a deletion.

The chain's head is anchored: its seq and hash are appended to
`<name>.anchors` (beside the log, MAC'd too) and written to the daemon's own
log when the log is created, at each rotation and at shutdown. So cutting
entries off the end is found too, back to the last anchor; `verify` says
what lies after it (it cannot prove that nothing followed the last entry
since). The chain continues across restarts and rotation: every write takes
an exclusive lock, reads the hash of the last line, and appends one line. At
`max_bytes` the file is moved to `<name>-<UTC time>.jsonl`; archives beyond
`max_total_bytes` are deleted oldest first, and an `audit.prune` entry says
through which seq, so `verify` can tell pruning from deletion.

Refused authentications are counted, not each written: the first from a
source in a window is written at once, the rest as one entry with a count
when the window ends (`AuthFailures`). Never a secret or a prompt: actors are
token fingerprints, details are ids, model references and outcomes.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from rbee_common.errors import ConfigError

if TYPE_CHECKING:
    from rbee_common.config import HiveSettings, QueenSettings

log = logging.getLogger("rbee.audit")

GENESIS = "0" * 64
MAX_BYTES = 10 * 1024 * 1024
MAX_TOTAL_BYTES = 100 * 1024 * 1024
CHAIN = "hmac-sha256"
"""The `chain` field of every entry. rbee 0.1 wrote plain SHA-256 chains, which anyone can recompute
after an edit: `verify` refuses those (archive such a log; the daemon starts a keyed one)."""
_TAIL_BYTES = 64 * 1024


def canonical(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_hash(entry: dict[str, Any], key: bytes | None = None) -> str:
    """The entry's MAC under `key` (without one, its plain SHA-256: what an editor without the key
    could compute, and what rbee 0.1 wrote)."""
    body = {k: v for k, v in entry.items() if k != "entry_hash"}
    data = (body["previous_hash"] + canonical(body)).encode()
    if key is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def default_key_path() -> Path:
    from rbee_common.config import config_dir

    return config_dir() / "audit.key"


def load_key(path: Path, *, create: bool) -> bytes:
    """The audit key in `path` (hex, one line, mode 0600); made there when `create` and missing."""
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileExistsError):  # another daemon made it first: read theirs
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
            log.info("audit key created: %s", path)
    try:
        info = path.stat()
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ConfigError(f"No audit key at {path}.",
                          hint="Run this as the user the daemons run as, or give --key FILE.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"Cannot read the audit key {path}: {type(error).__name__}.") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"The audit key {path} is readable by others.", hint=f"chmod 600 {path}")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ConfigError(f"The audit key {path} is not a key (64 hex digits).",
                          hint="Restore it from a backup; a new key cannot verify the old entries.")
    return key


def _clip(value: Any) -> Any:
    """Client-supplied strings are kept short; JSON escapes their control characters."""
    if isinstance(value, str):
        return value[:200]
    if isinstance(value, dict):
        return {str(k)[:64]: _clip(v) for k, v in list(value.items())[:32]}
    if isinstance(value, list | tuple):
        return [_clip(v) for v in list(value)[:32]]
    return value if isinstance(value, int | float | bool) or value is None else str(value)[:200]


def anchors_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.anchors")


class AuditLog:
    def __init__(
        self, path: Path, *, component: str, max_bytes: int = MAX_BYTES,
        max_total_bytes: int = MAX_TOTAL_BYTES, key_path: Path | None = None,
    ) -> None:
        self.path = path
        self.component = component
        self.max_bytes = max_bytes
        self.max_total_bytes = max_total_bytes
        self.key = load_key(key_path or default_key_path(), create=True)
        self._disk_warned = 0.0

    @classmethod
    def of_daemon(cls, name: str, *, component: str, settings: QueenSettings | HiveSettings) -> AuditLog:
        """A daemon's log, `audit/<name>` in the state dir, as its config section sets it up."""
        from rbee_common.config import state_dir

        key = Path(settings.audit_key_file).expanduser() if settings.audit_key_file else None
        return cls(state_dir() / "audit" / name, component=component, max_bytes=settings.audit_max_bytes,
                   max_total_bytes=settings.audit_max_total_bytes, key_path=key)

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
                new_log = seq == 0 and not anchors_path(self.path).exists()
                if self.path.exists() and self.path.stat().st_size >= self.max_bytes:
                    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
                    archive = self.path.with_name(f"{self.path.stem}-{stamp}{self.path.suffix}")
                    os.replace(self.path, archive)  # the next entry starts the new file, chained to it
                    log.info("audit log rotated: %s", archive.name)
                    previous, seq = self._append(previous, seq, "audit.rotate", "system", "ok", None,
                                                 {"archive": archive.name})
                    self._anchor(previous, seq, "rotation")
                    previous, seq = self._prune(previous, seq)
                previous, seq = self._append(previous, seq, event_type, actor, outcome, correlation_id,
                                             details)
                if new_log:
                    self._anchor(previous, seq, "start")
        except OSError as error:
            log.error("audit entry %s not written: %s", event_type, error.strerror)
            return
        self._check_disk()

    def anchor(self, why: str = "shutdown") -> None:
        """Write the chain's head to the anchors file and the daemon's log (at shutdown)."""
        try:
            with self._locked():
                previous, seq = self._tail()
                if seq:
                    self._anchor(previous, seq, why)
        except OSError as error:
            log.error("audit head not anchored: %s", error.strerror)

    def _anchor(self, head: str, seq: int, why: str) -> None:
        record: dict[str, Any] = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "entry_hash": head,
                                  "file": self.path.name, "seq": seq, "why": why}
        record["mac"] = hmac.new(self.key, canonical(record).encode(), hashlib.sha256).hexdigest()
        fd = os.open(anchors_path(self.path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (canonical(record) + "\n").encode())
        finally:
            os.close(fd)
        log.info("audit head %s seq=%d entry_hash=%s (%s)", self.path.name, seq, head, why)

    def _prune(self, previous: str, seq: int) -> tuple[str, int]:
        """Delete the oldest archives until all of them hold at most `max_total_bytes`."""
        archives = chain_files(self.path)[:-1]  # not the live file (it holds the rotation entry)
        sizes = [archive.stat().st_size for archive in archives]
        removed: list[str] = []
        through = 0
        while archives and sum(sizes) > self.max_total_bytes:
            oldest = archives.pop(0)
            sizes.pop(0)
            with open(oldest, "rb") as handle:
                through = max(through, _last(handle.fileno())[1])
            oldest.unlink()
            removed.append(oldest.name)
        if not removed:
            return previous, seq
        log.info("audit archives pruned to %d bytes: %s", self.max_total_bytes, ", ".join(removed))
        return self._append(previous, seq, "audit.prune", "system", "ok", None,
                            {"removed": removed, "through_seq": through})

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
            "previous_hash": previous, "chain": CHAIN,
        }
        entry["entry_hash"] = entry_hash(entry, self.key)
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


class AuthFailures:
    """Refused authentications, one entry per source per `window_s`: the first at once, the rest as
    one entry with their count and reasons when the window has passed (`flush`, called on each
    failure, by the daemon's loop, and at shutdown). 0 writes each one."""

    MAX_SOURCES = 4096

    class _Window(msgspec.Struct):
        started: float
        count: int = 0
        reasons: dict[str, int] = msgspec.field(default_factory=dict)
        actor: str = "anonymous"
        path: str = ""

    def __init__(self, audit: AuditLog, window_s: float) -> None:
        self.audit = audit
        self.window_s = window_s
        self._windows: dict[str, AuthFailures._Window] = {}

    def refused(self, source: str, reason: str, identity: str | None, path: str) -> None:
        now = time.monotonic()
        self.flush(now)
        window = self._windows.get(source)
        if window is None or self.window_s <= 0:
            if len(self._windows) >= self.MAX_SOURCES:  # a flood from many sources: write, then forget
                self.flush(now, every=True)
            if self.window_s > 0:
                self._windows[source] = self._Window(started=now)
            self.audit.record("auth.failure", actor=identity or "anonymous", outcome="refused", reason=reason,
                              path=path, source=source, count=1)
            return
        window.count += 1
        window.reasons[reason] = window.reasons.get(reason, 0) + 1
        window.actor, window.path = identity or "anonymous", path

    def flush(self, now: float | None = None, *, every: bool = False) -> None:
        """Write the counts of windows that have passed (of all of them with `every`)."""
        now = time.monotonic() if now is None else now
        for source, window in list(self._windows.items()):
            if every or now - window.started >= self.window_s:
                del self._windows[source]
                if window.count:
                    reason = max(window.reasons, key=lambda r: window.reasons[r])
                    self.audit.record(
                        "auth.failure", actor=window.actor, outcome="refused", reason=reason,
                        path=window.path, source=source, count=window.count, reasons=window.reasons,
                        window_s=round(min(now - window.started, self.window_s), 1))


async def flush_audit_forever(failures: AuthFailures) -> None:
    """Write each window's count of refusals soon after it ends (a daemon's background loop)."""
    while True:
        await trio.sleep(max(failures.window_s, 1.0))
        failures.flush()


def close_audit(failures: AuthFailures) -> None:
    """At shutdown: the counts still open, then the chain's head to the anchors."""
    failures.flush(every=True)
    failures.audit.anchor("shutdown")


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
    archives = sorted(path.parent.glob(f"{glob.escape(path.stem)}-*{path.suffix}"))
    archives = [a for a in archives if re.fullmatch(rf"{re.escape(path.stem)}-\d{{8}}T\d+Z", a.stem)]
    return [*archives, *([path] if path.exists() else [])]


class Verified(msgspec.Struct, kw_only=True):
    """What `verify` proved, and what it could not."""

    entries: int = 0
    first_seq: int = 0
    pruned_through: int = 0
    """Entries up to this seq were in archives deleted by pruning (recorded in the chain)."""
    anchored_seq: int = 0
    anchored_at: str = ""
    last_seq: int = 0

    def caveats(self) -> list[str]:
        said = []
        if self.pruned_through:
            said.append(f"entries up to seq {self.pruned_through} were pruned (archives over the size limit)")
        if self.last_seq > self.anchored_seq:
            said.append(f"entries after seq {self.anchored_seq} (anchored {self.anchored_at}) could have "
                        "been cut off the end unnoticed until the next anchor; compare with the daemon log's "
                        "'audit head' lines")
        return said


def verify(files: list[Path], key: bytes, anchors: Path | None = None) -> Verified:
    """Check one chain across `files` in order (every MAC under `key`, every link), and its end
    against the anchors file: what it proved, or `Broken` at the first bad line."""
    result = Verified()
    previous: str | None = None
    hashes: dict[int, str] = {}
    prunes: list[int] = []
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
                if not isinstance(entry.get("previous_hash"), str) or not isinstance(entry.get("seq"), int):
                    raise Broken(file, number, "it lacks its chain fields")
                if entry.get("chain") != CHAIN:
                    raise Broken(file, number, "an entry without a keyed MAC (rbee 0.1's, or forged): "
                                               "it cannot be proven")
                if not hmac.compare_digest(str(entry.get("entry_hash")), entry_hash(entry, key)):
                    raise Broken(file, number, "its MAC does not match its content (edited, or another key)")
                if previous is None:
                    result.first_seq = entry["seq"]
                    if entry["previous_hash"] != GENESIS and entry["seq"] == 1:
                        raise Broken(file, number, "the first entry does not start a chain")
                elif entry.get("previous_hash") != previous or entry["seq"] != result.last_seq + 1:
                    raise Broken(file, number, "it does not follow the entry before it (one is missing)")
                if entry.get("event_type") == "audit.prune":
                    through = entry.get("details", {}).get("through_seq")
                    prunes.append(through if isinstance(through, int) else 0)
                previous = str(entry["entry_hash"])
                hashes[entry["seq"]] = previous
                result.last_seq = entry["seq"]
                result.entries += 1
    if files and result.first_seq > 1:
        result.pruned_through = max(prunes, default=0)
        if result.pruned_through < result.first_seq - 1:
            raise Broken(files[0], 1, f"entries before seq {result.first_seq} are missing, and no "
                                      "audit.prune entry accounts for them (an archive was deleted)")
    if anchors is not None:
        _check_anchors(anchors, files, hashes, key, result)
    return result


def _check_anchors(
    anchors: Path, files: list[Path], hashes: dict[int, str], key: bytes, result: Verified,
) -> None:
    last = files[-1] if files else anchors
    try:
        lines = anchors.read_text(encoding="ascii").splitlines()
    except FileNotFoundError:
        if result.entries:
            raise Broken(anchors, 0, "the anchors file is missing (deleted?)") from None
        return
    except (OSError, UnicodeDecodeError):
        raise Broken(anchors, 0, "the anchors file cannot be read") from None
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            seq, head, mac = int(record["seq"]), str(record["entry_hash"]), str(record["mac"])
        except (ValueError, KeyError, TypeError):
            raise Broken(anchors, number, "not an anchor") from None
        body = {k: v for k, v in record.items() if k != "mac"}
        expected = hmac.new(key, canonical(body).encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mac, expected):
            raise Broken(anchors, number, "its MAC does not match (edited, or another key)")
        if seq > result.last_seq:
            raise Broken(last, 0, f"the log ends at seq {result.last_seq}, but its head was anchored at seq "
                                  f"{seq} on {record.get('at')}: entries were cut off the end")
        if seq in hashes and hashes[seq] != head:
            raise Broken(last, 0, f"seq {seq} is not the entry anchored on {record.get('at')} (rewritten)")
        if seq >= result.anchored_seq:
            result.anchored_seq, result.anchored_at = seq, str(record.get("at", ""))


AUDITED_OPERATIONS = {
    "hive_install": "hive.install", "hive_uninstall": "hive.uninstall", "hive_start": "hive.start",
    "hive_stop": "hive.stop", "worker_spawn": "worker.spawn", "worker_stop": "worker.stop",
    "worker_scale": "worker.scale",
    "model_download": "model.download", "model_delete": "model.delete", "model_share": "model.share",
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
