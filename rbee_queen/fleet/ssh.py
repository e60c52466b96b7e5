"""SSH for the queen: every line of asyncssh code in rbee lives here.

asyncssh runs on asyncio; the queen runs on trio. `trio_asyncio` bridges them:
the queen opens one asyncio loop inside its trio run (`open_loop`), and each
call here goes through `aio_as_trio`. Callers see plain trio functions and
rbee errors that name the host and the fix:

- host keys are checked against a known_hosts file; a key for a host that
  has none there is accepted (and recorded) only under `accept-new`, and a
  changed key is never accepted;
- connecting is retried with backoff on timeouts and unreachable hosts, never
  on a refused key.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shlex
import socket
import stat
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import trio
import trio_asyncio

from rbee_common.errors import (
    RemoteDiskFull,
    RemoteFailed,
    SshAuthFailed,
    SshCommandFailed,
    SshCommandTimeout,
    SshConnectionLost,
    SshCopyFailed,
    SshFailed,
    SshHostKeyChanged,
    SshHostKeyUnknown,
    SshKeyNotFound,
    SshKeyPermissions,
    SshTimeout,
    SshUnreachable,
)

# asyncssh still imports DSA, and cryptography warns of it at every queen start and --help, about
# code rbee never calls: silenced for that import only.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="DSA is deprecated")
    import asyncssh

log = logging.getLogger("rbee.queen.ssh")
T = TypeVar("T")

open_loop = trio_asyncio.open_loop
"""The asyncio loop SSH needs: `async with open_loop():` around the queen's work."""


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """Where and how to log in."""

    alias: str
    host: str
    port: int = 22
    user: str | None = None
    identity_file: str | None = None
    known_hosts: str
    accept_new: bool = False
    connect_timeout_s: float = 10.0
    attempts: int = 3

    @property
    def where(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"{self.alias} ({user}{self.host}:{self.port})"


class Completed(msgspec.Struct, frozen=True):
    code: int
    stdout: str
    stderr: str


async def _aio(function: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    result: T = await trio_asyncio.aio_as_trio(function)(*args, **kwargs)
    return result


def quote(value: str) -> str:
    """A value for the remote shell, quoted."""
    return shlex.quote(value)


def program(path: str) -> str:
    """A program path for the remote shell: quoted, with a leading `~/` left for the shell to expand."""
    return "~/" + quote(path[2:]) if path.startswith("~/") else quote(path)


def _key_path(target: Target) -> Path | None:
    """The identity file, checked here first: a missing or open key gets a clear error."""
    if target.identity_file is None:
        return None
    path = Path(target.identity_file).expanduser()
    if not path.is_file():
        raise SshKeyNotFound(
            f"SSH key not found for {target.alias}: {path}.",
            details={"hive_id": target.alias, "identity_file": str(path)},
            hint=f"Fix identity_file in [hives.{target.alias}], or create the key (ssh-keygen -f {path}).",
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SshKeyPermissions(
            f"SSH key {path} for {target.alias} is readable by others (mode {mode:04o}); "
            "OpenSSH and rbee refuse such keys.",
            details={"hive_id": target.alias, "identity_file": str(path)}, hint=f"chmod 600 {path}",
        )
    return path


@functools.lru_cache(maxsize=256)
def _config_host(host: str, mtime: float) -> str:
    try:
        resolved = asyncssh.SSHClientConnectionOptions(host=host, config=()).host  # (): ~/.ssh/config
    except (asyncssh.Error, OSError, ValueError) as error:
        log.warning("~/.ssh/config could not be read for %s: %s", host, type(error).__name__)
        return host
    return str(resolved or host)


def real_host(host: str) -> str:
    """`host` as `ssh host` reaches it: ~/.ssh/config's `HostName` for a `Host` alias, else itself.

    The queen talks HTTP to a hive (and takes its workers' heartbeats) at this address.
    """
    try:
        mtime = Path("~/.ssh/config").expanduser().stat().st_mtime
    except OSError:
        return host
    return _config_host(host, mtime)


def _address(host: str) -> str:
    """`host`'s address ("" when it does not resolve): known_hosts lines may name either."""
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except (OSError, UnicodeError, IndexError):
        return ""


def _known_keys(
    target: Target, host: str | None = None, addr: str | None = None, port: int | None = None,
) -> list[asyncssh.SSHKey]:
    """The keys known_hosts has for the host, by its name and by its address, as `ssh` matches them.

    `host`/`addr`: what the connection reached (after ~/.ssh/config's HostName); else the target's.
    """
    path = Path(target.known_hosts).expanduser()
    if not path.is_file():
        return []
    host = host or target.host
    addr = _address(host) if addr is None else addr
    trusted = asyncssh.match_known_hosts(str(path), host, addr, port or target.port)[0]
    return list(trusted)


class _AcceptNew(asyncssh.SSHClient):
    """`accept-new`: a host with no key in known_hosts is trusted once, and recorded."""

    def __init__(self, target: Target) -> None:
        self.target = target

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        if _known_keys(self.target, host, addr, port):
            return False  # it has a different key on record: that is a changed key, never accepted
        path = Path(self.target.known_hosts).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        name = host if port == 22 else f"[{host}]:{port}"
        line = f"{name} {key.export_public_key('openssh').decode().strip()}\n"
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line)
        log.warning("accepted new host key for %s (%s), recorded in %s", self.target.alias,
                    key.get_fingerprint(), path)
        return True


class Session:
    """One SSH connection to a host."""

    def __init__(self, target: Target, connection: asyncssh.SSHClientConnection) -> None:
        self.target = target
        self.connection = connection

    def peer(self) -> tuple[str, int]:
        """The address and port this connection reached (after ~/.ssh/config and DNS)."""
        peername = self.connection.get_extra_info("peername")
        return (str(peername[0]), int(peername[1])) if peername else (self.target.host, self.target.port)

    def local_address(self) -> str:
        """Our address as the host sees it: where it can reach us back."""
        sockname = self.connection.get_extra_info("sockname")
        return str(sockname[0]) if sockname else "127.0.0.1"

    async def run(self, command: str, *, limit_s: float = 120.0, check: bool = True) -> Completed:
        """Run `command` to its end (at most `limit_s`); a non-zero exit raises when `check`."""
        try:
            result = await _aio(self.connection.run, command, check=False, timeout=limit_s)
        except asyncssh.TimeoutError:
            raise SshCommandTimeout(
                f"A command on {self.target.where} did not finish within {limit_s:g} s.",
                details={"hive_id": self.target.alias},
            ) from None
        except (asyncssh.Error, OSError) as error:
            raise _lost(self.target, error) from None
        done = Completed(
            code=int(result.exit_status if result.exit_status is not None else 255),
            stdout=str(result.stdout or ""), stderr=str(result.stderr or ""),
        )
        if check and done.code != 0:
            raise SshCommandFailed(
                f"A command failed on {self.target.where} (exit {done.code}): {last_line(done.stderr)}",
                details={"hive_id": self.target.alias, "exit_code": done.code},
            )
        return done

    async def put(
        self, files: list[Path], remote_dir: str, on_file: Callable[[Path], None], *, again: bool = False
    ) -> None:
        """Copy `files` into `remote_dir` over SFTP (one of the same size there is skipped unless `again`)."""
        try:
            async with trio_asyncio.aio_as_trio(self.connection.start_sftp_client()) as sftp:
                for file in files:
                    remote = f"{remote_dir}/{file.name}"
                    with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                        if not again and (await _aio(sftp.stat, remote)).size == file.stat().st_size:
                            on_file(file)
                            continue
                    await _aio(sftp.put, str(file), remote + ".part")
                    await _aio(sftp.posix_rename, remote + ".part", remote)
                    on_file(file)
        except asyncssh.SFTPFailure as error:
            raise _sftp_failed(self.target, error) from None
        except (asyncssh.Error, OSError) as error:
            raise _lost(self.target, error) from None

    async def write_file(self, remote_path: str, data: bytes, *, mode: int = 0o600) -> None:
        """Write a small file, created with `mode` (no moment where others could read it)."""
        try:
            async with trio_asyncio.aio_as_trio(self.connection.start_sftp_client()) as sftp:
                attrs = asyncssh.SFTPAttrs(permissions=mode)
                async with trio_asyncio.aio_as_trio(sftp.open(remote_path + ".part", "wb", attrs)) as handle:
                    await _aio(handle.write, data)
                await _aio(sftp.chmod, remote_path + ".part", mode)
                await _aio(sftp.posix_rename, remote_path + ".part", remote_path)
        except asyncssh.SFTPFailure as error:
            raise _sftp_failed(self.target, error) from None
        except (asyncssh.Error, OSError) as error:
            raise _lost(self.target, error) from None

    async def forward_local(self, remote_port: int) -> int:
        """A port on our loopback that reaches 127.0.0.1:`remote_port` on the host, through this
        connection (open while it is)."""
        try:
            listener = await _aio(self.connection.forward_local_port, "127.0.0.1", 0, "127.0.0.1",
                                  remote_port)
        except (asyncssh.Error, OSError) as error:
            raise _lost(self.target, error) from None
        return int(listener.get_port())

    async def forward_remote(self, local_port: int) -> int:
        """A port on the host's loopback that reaches 127.0.0.1:`local_port` here, through this
        connection (open while it is; sshd binds it to loopback unless GatewayPorts says otherwise,
        and we ask for loopback)."""
        try:
            listener = await _aio(self.connection.forward_remote_port, "127.0.0.1", 0, "127.0.0.1",
                                  local_port)
        except asyncssh.ChannelListenError:
            raise SshFailed(f"The SSH server of {self.target.where} refused to forward a port.",
                            details={"hive_id": self.target.alias},
                            hint="Allow it in its sshd_config: AllowTcpForwarding yes (or remote).") from None
        except (asyncssh.Error, OSError) as error:
            raise _lost(self.target, error) from None
        return int(listener.get_port())

    def closed(self) -> bool:
        return self.connection.is_closed()

    @contextlib.asynccontextmanager
    async def process(self, command: str) -> AsyncIterator[Process]:
        """A long-running remote command whose stdin we hold open (its lifeline)."""
        try:
            process = await _aio(self.connection.create_process, command, encoding="utf-8", errors="replace")
        except (asyncssh.Error, OSError) as error:
            raise _lost(self.target, error) from None
        try:
            yield Process(process)
        finally:
            with contextlib.suppress(Exception):
                process.stdin.write_eof()  # the lifeline: EOF on its stdin
                process.close()


class Process:
    def __init__(self, process: asyncssh.SSHClientProcess[str]) -> None:
        self._process = process

    async def readline(self, stream: str = "stdout") -> str:
        """One line of output; "" at EOF (or when the connection is gone)."""
        reader = self._process.stdout if stream == "stdout" else self._process.stderr
        try:
            line: str = await _aio(reader.readline)
        except (asyncssh.Error, OSError):
            return ""
        return line

    async def wait(self) -> int | None:
        try:
            await _aio(self._process.wait_closed)
        except (asyncssh.Error, OSError):
            return None
        return self._process.exit_status


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no error output)"


def _lost(target: Target, error: BaseException) -> RemoteFailed:
    return SshConnectionLost(
        f"The SSH connection to {target.where} failed: {type(error).__name__}.",
        details={"hive_id": target.alias}, hint="Check that the host is up and try again.",
    )


def _sftp_failed(target: Target, error: asyncssh.SFTPError) -> RemoteFailed:
    reason = str(error.reason or "")
    if "space" in reason.lower() or "quota" in reason.lower():
        return RemoteDiskFull(
            f"The disk is full on {target.where}: {reason}.",
            details={"hive_id": target.alias}, hint="Free space there, or set install_dir to a bigger disk.",
        )
    return SshCopyFailed(f"Copying a file to {target.where} failed: {reason}.",
                         details={"hive_id": target.alias})


def _options(target: Target, key: Path | None) -> dict[str, Any]:
    """asyncssh's options, as `ssh` would pick them.

    ~/.ssh/config applies (asyncssh reads it): `Host` aliases, `HostName`, `User`, `Port`,
    `IdentityFile`, `ProxyJump`. What the hive's entry says explicitly wins over it; what it
    leaves out (no user, the default port 22) the config decides, and then the defaults: the
    local user, port 22.
    """
    known_hosts = os.path.expanduser(target.known_hosts)
    options: dict[str, Any] = {
        "host": target.host, "known_hosts": known_hosts,
        "connect_timeout": target.connect_timeout_s, "keepalive_interval": 5.0, "keepalive_count_max": 3,
    }
    if target.user is not None:
        options["username"] = target.user
    if target.port != 22:
        options["port"] = target.port
    if key is not None:
        options.update(client_keys=[str(key)], agent_path=None)
    if target.accept_new:
        options["client_factory"] = lambda: _AcceptNew(target)
    if not os.path.isfile(known_hosts):
        # No file: nothing is trusted yet (asyncssh would skip the check, or fail to read it);
        # under accept-new the first key is recorded in a new file.
        options["known_hosts"] = ([], [], [])
    return options


@contextlib.asynccontextmanager
async def connect(target: Target, say: Callable[[str], None]) -> AsyncIterator[Session]:
    """Log in to `target` (retried with backoff on timeouts and unreachable hosts)."""
    key = _key_path(target)
    options = _options(target, key)
    delay = 0.2
    connection: asyncssh.SSHClientConnection | None = None
    for attempt in range(1, target.attempts + 1):
        try:
            connection = await _aio(asyncssh.connect, **options)
            break
        except asyncssh.PermissionDenied:
            raise SshAuthFailed(
                f"SSH authentication failed on {target.where}: the host refused "
                + (f"the key {key}." if key else "every key this queen offered (its default keys)."),
                details={"hive_id": target.alias, "identity_file": str(key or "")},
                hint=(f"Add {key}.pub to ~/.ssh/authorized_keys of {target.user or 'the user'} there "
                      f"(ssh-copy-id -i {key} -p {target.port} {target.host}), check that the key file "
                      f"is mode 600 (chmod 600 {key}), or fix identity_file in [hives.{target.alias}]."
                      if key else f"Set identity_file in [hives.{target.alias}]."),
            ) from None
        except asyncssh.HostKeyNotVerifiable:
            raise _host_key_error(target) from None
        except (TimeoutError, OSError) as error:
            unreachable = isinstance(error, OSError) and error.errno in (
                errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNREFUSED)
            what = (os.strerror(error.errno) if unreachable and isinstance(error, OSError) and error.errno
                    else f"no answer within {target.connect_timeout_s:g} s")
            if attempt == target.attempts:
                raise (SshUnreachable if unreachable else SshTimeout)(
                    f"Cannot reach {target.where} over SSH: {what} (tried {attempt} times).",
                    details={"hive_id": target.alias, "attempts": attempt,
                             "timeout_s": target.connect_timeout_s},
                    hint=f"Check that {target.host} is up, that sshd listens on port {target.port}, "
                         "and that no firewall is in the way.",
                ) from None
            say(f"SSH attempt {attempt} of {target.attempts} to {target.where}: {what}; "
                f"retrying in {delay:g} s")
            await trio.sleep(delay)
            delay *= 2
        except asyncssh.Error as error:
            raise SshFailed(
                f"SSH to {target.where} failed: {error.reason}.", details={"hive_id": target.alias},
            ) from None
    if connection is None:  # attempts >= 1: the loop either connected or raised
        raise SshFailed(f"SSH to {target.where} was not attempted.")
    try:
        yield Session(target, connection)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            connection.close()
            with contextlib.suppress(Exception):
                await _aio(connection.wait_closed)


def _host_key_error(target: Target) -> RemoteFailed:
    known = Path(target.known_hosts).expanduser()
    if _known_keys(target):
        return SshHostKeyChanged(
            f"The host key of {target.where} does not match the one in {known}: it changed, or "
            "someone is in the middle.", details={"hive_id": target.alias},
            hint=f"If it was reinstalled, remove its old line: ssh-keygen -R {target.host} -f {known}",
        )
    return SshHostKeyUnknown(
        f"The host key of {target.where} is not in {known}.", details={"hive_id": target.alias},
        hint=f"Check its fingerprint and add it (ssh-keyscan -p {target.port} {target.host} >> {known}), "
             f'or set host_key_policy = "accept-new" in [hives.{target.alias}].',
    )
