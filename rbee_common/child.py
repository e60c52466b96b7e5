"""Child processes that die with us: started from trio's own thread.

Linux's PR_SET_PDEATHSIG (which our workers ask for) fires when the *thread*
that forked the child exits, not the process. `trio.lowlevel.open_process`
forks from a cached worker thread, and trio retires idle worker threads after
10 seconds: every worker would then be SIGKILLed ten seconds after its spawn.
So `spawn_child` calls `subprocess.Popen` on the thread that runs trio, which
lives as long as the process (a fork+exec costs a few milliseconds), and waits
for the exit through a pidfd where there is one, a thread otherwise.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Sequence

import trio


def _popen(
    argv: Sequence[str], *, stderr: int, pass_fds: Sequence[int], stdout: int, env: dict[str, str] | None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, pass_fds=tuple(pass_fds),
        close_fds=True, env=env,
    )


class Child:
    """A running child: its pid, its stdout as a trio stream, signals, and an async wait."""

    def __init__(self, popen: subprocess.Popen[bytes], stdout: trio.lowlevel.FdStream) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.stdout = stdout

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def send_signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signum)

    async def wait(self) -> int:
        if self.popen.poll() is not None:
            return int(self.popen.returncode)
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is not None:
            try:
                fd = pidfd_open(self.pid)
            except OSError:
                fd = None
            if fd is not None:
                try:
                    await trio.lowlevel.wait_readable(fd)
                finally:
                    os.close(fd)
                return int(self.popen.wait())
        return int(await trio.to_thread.run_sync(self.popen.wait, abandon_on_cancel=True))


def spawn_child(
    argv: Sequence[str], *, stderr: int, pass_fds: Sequence[int] = (), env: dict[str, str] | None = None
) -> Child:
    """Start `argv` with its stdout piped to us; raises OSError if it cannot start."""
    read_end, write_end = os.pipe()
    try:
        popen = _popen(argv, stderr=stderr, pass_fds=pass_fds, stdout=write_end, env=env)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return Child(popen, trio.lowlevel.FdStream(read_end))
