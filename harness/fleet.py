"""A fleet site for tests: namespace hosts with sshd, a wheelhouse, a config, a queen.

`Site` is one test's world: its own XDG directories (so the queen's install
records and known_hosts are its own), a config file that the keeper edits,
and helpers to run `rbee-keeper` and start `queen-rbee` on the bridge
address with a token, as an operator would.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.helpers import BIN, Daemon, daemon
from harness.netns import Fleet, Host

TOKEN = "queen-test-token-0123456789abcdef"

# pip's cache as the tests found it (the suites point XDG_CACHE_HOME elsewhere per test);
# with it, building the wheelhouse takes seconds instead of compiling llama.cpp again.
PIP_CACHE = os.environ.get("PIP_CACHE_DIR") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pip")
# Likewise rbee's own llama-cpp-python builds (with RPC), which the wheelhouse takes.
LLAMA_WHEELS = os.environ.get("RBEE_LLAMA_WHEELS") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rbee", "wheels")


@dataclass
class Site:
    fleet: Fleet
    root: Path
    wheelhouse: Path
    env: dict[str, str] = field(default_factory=dict)
    queen_url: str = ""

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    def host(self, name: str) -> Host:
        return next(h for h in self.fleet.hosts if h.name == name)

    def keeper(self, *args: str, timeout: float = 300.0, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env}
        env.pop("RBEE_API_TOKEN", None)
        if token is not None:
            env["RBEE_API_TOKEN"] = token
        argv = [str(BIN / "rbee-keeper"), *(["--queen-url", self.queen_url] if self.queen_url else []), *args]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)

    def add_hive(
        self, alias: str, host: Host, *, key: Path | None = None, extra: str = "", install_dir: str | None = None
    ) -> None:
        done = self.keeper(
            "hive", "add", alias, "--host", host.address, "--user", "root",
            "--identity-file", str(key or self.fleet.client_key),
            "--install-dir", install_dir or str(self.root / "remote" / alias / "rbee"), "--hive-port", "9000",
        )
        assert done.returncode == 0, done.stderr
        if extra:
            text = self.config.read_text()
            self.config.write_text(text.replace(f"[hives.{alias}]\n", f"[hives.{alias}]\n{extra}\n"))

    @contextlib.contextmanager
    def queen(self) -> Iterator[Daemon]:
        token_file = self.root / "queen.token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        env = {**self.env}
        with daemon(
            [str(BIN / "queen-rbee"), "--host", self.fleet.gateway, "--port", "0",
             "--api-token-file", str(token_file)], env=env, timeout=60,
        ) as queen:
            self.queen_url = queen.url
            try:
                yield queen
            finally:
                self.queen_url = ""


def make_site(fleet: Fleet, root: Path, wheelhouse: Path) -> Site:
    root.mkdir(parents=True, exist_ok=True)
    env = {
        "RBEE_CONFIG": str(root / "config.toml"),
        "XDG_CONFIG_HOME": str(root / "xdg-config"),
        "XDG_STATE_HOME": str(root / "xdg-state"),
        "XDG_DATA_HOME": str(root / "xdg-data"),
        "XDG_CACHE_HOME": str(root / "xdg-cache"),
        "RBEE_LOG": "INFO",
    }
    (root / "config.toml").write_text(
        "[queen]\n"
        f'known_hosts = "{fleet.known_hosts}"\n'
        f'wheelhouse = "{wheelhouse}"\n'
        "hive_start_timeout_s = 60\n"
        "\n[hive]\nworker_stop_grace_s = 2\n"
    )
    return Site(fleet=fleet, root=root, wheelhouse=wheelhouse, env=env)


def build_wheelhouse(directory: Path) -> Path:
    """The wheels `hive install` uploads, built once per test session (pip's cache makes it quick)."""
    done = subprocess.run([str(BIN / "rbee-keeper"), "hive", "wheelhouse", "--dir", str(directory)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PIP_CACHE_DIR": PIP_CACHE, "RBEE_LLAMA_WHEELS": LLAMA_WHEELS})
    assert done.returncode == 0, done.stderr
    return directory


def altered_wheelhouse(source: Path, target: Path, *, drop: str | None = None, platform: str | None = None) -> Path:
    """A copy of a wheelhouse (hard links) without the wheels named `drop-*`, or claiming another platform."""
    manifest = json.loads((source / "wheelhouse.json").read_text())
    if drop is not None:
        manifest["wheels"] = [w for w in manifest["wheels"] if not w.startswith(f"{drop}-")]
    if platform is not None:
        manifest["platform"] = platform
    target.mkdir(parents=True)
    for wheel in (*manifest["wheels"], *manifest["no_deps"]):
        os.link(source / wheel, target / wheel)
    (target / "wheelhouse.json").write_text(json.dumps(manifest))
    return target

