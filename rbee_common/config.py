"""The rbee config file, and where things live on disk.

One TOML file serves every program on a machine:

    [queen]                # queen-rbee
    port = 8500
    [hive]                 # rbee-hive on this machine
    port = 9000
    [keeper]               # rbee-keeper
    queen_url = "http://127.0.0.1:8500"
    [hives.gpu-node-1]     # a hive the queen manages (DESIGN §7)
    host = "10.0.0.5"

It is found at `--config PATH`, else `$RBEE_CONFIG`, else
`$XDG_CONFIG_HOME/rbee/config.toml` (`~/.config/...`), else
`/etc/rbee/config.toml`; with none of them, the defaults hold. Environment
variables override single keys: `RBEE_<SECTION>__<KEY>` (for example
`RBEE_QUEEN__PORT=8600`), and `RBEE_QUEEN_URL` sets `keeper.queen_url`.
An unknown key, in the file or the environment, is an error that names it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from rbee_common.errors import ConfigError
from rbee_common.paths import cache_dir as cache_dir
from rbee_common.paths import config_dir as config_dir
from rbee_common.paths import data_dir as data_dir
from rbee_common.paths import state_dir as state_dir
from rbee_common.validation import describe_validation_error

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Positive = Annotated[float, msgspec.Meta(gt=0)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class QueenSettings(_Section, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Port = 8500
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1 << 20
    max_live_jobs: Annotated[int, msgspec.Meta(ge=1)] = 64
    max_finished_jobs: Annotated[int, msgspec.Meta(ge=0)] = 1000
    job_retention_s: Positive = 600.0
    event_buffer: Annotated[int, msgspec.Meta(ge=16)] = 10_000
    hive_probe_timeout_s: Positive = 2.0
    default_deadline_s: Annotated[float, msgspec.Meta(ge=0)] = 600.0
    """An inference whose client set no deadline (X-Request-Deadline, or a timeout) gets this one;
    0: none. 600 s is the OpenAI clients' own default timeout."""
    worker_stale_s: Positive = 15.0
    """A worker silent this long (three missed heartbeats of 5 s; data on its streams counts as one)
    leaves the registry."""
    local_hive: bool = False
    """Run the `localhost` hive inside the queen (`queen-rbee --local-hive`)."""
    queue_size: Annotated[int, msgspec.Meta(ge=0)] = 64
    """Requests per model that may wait for a free worker slot; more get 429."""
    queue_timeout_s: Positive = 60.0
    """How long a request waits for a slot before it gets 503."""
    cold_start: bool = True
    """No worker for a model: start one on the best hive."""
    pull_on_demand: bool | None = None
    """A request for a Hub model no hive has (`hf:org/repo[:quant]`, `hf.co/org/repo`, or a
    https://huggingface.co URL) downloads it to the hive the cold start picks, first. None: on when
    the queen listens on loopback only (one user's machine), off otherwise: a client on the network
    must not fill the hives' disks with whatever it names."""
    prefix_routing: bool = True
    """Send a request to the worker that holds most of its prompt's prefix (its slots and RAM
    cache, as its heartbeats and this queen's own requests say), unless that worker is busier than
    the least loaded by more than `prefix_load_margin`."""
    prefix_min_share: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5
    """The share of a prompt's characters a worker must hold for the prefix to decide."""
    prefix_load_margin: Annotated[int, msgspec.Meta(ge=0)] = 4
    """Requests a prefix-holding worker may run beyond the least loaded one and still be chosen."""
    replicas: bool = True
    """Start more workers of a model while its requests wait (`scale_after_s`), and stop them when
    idle (`replica_idle_s`)."""
    scale_after_s: Positive = 2.0
    """How long the oldest request waiting for a model may wait before another worker starts."""
    max_workers_per_model: Annotated[int, msgspec.Meta(ge=0)] = 0
    """The most workers the queen runs of one model (0: as many devices as fit it)."""
    replica_idle_s: Positive = 60.0
    """A worker the queen added for a busy model stops after this long idle (the model's first
    worker stays until its hive's idle timeout)."""
    infer_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    """Workers tried for one request that fails before its first token."""
    known_hosts: str = "~/.ssh/known_hosts"
    """Host keys of the machines whose hives this queen installs and starts over SSH."""
    wheelhouse: str | None = None
    """Wheels uploaded at `hive_install` (default: $XDG_CACHE_HOME/rbee/wheelhouse, built when missing)."""
    advertise_url: str | None = None
    """The URL hives' workers heartbeat to (default: this queen's port on the address SSH used)."""
    hive_start_timeout_s: Positive = 60.0
    """A hive started over SSH that is not ready this long after is stopped, with its last log lines."""
    audit_max_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 10 * 1024 * 1024
    """The audit log is archived (and its chain continued in a new file) at this size."""
    audit_max_total_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 100 * 1024 * 1024
    """Archived audit logs are deleted, oldest first, beyond this total (the chain records it)."""
    audit_failure_window_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    """Refused authentications from one address are one audit entry per window, with a count; 0
    writes each."""
    audit_key_file: str | None = None
    """The audit chain's HMAC key (default: audit.key in the config dir, made on first use)."""
    metrics_public: bool = False
    """Serve /metrics without the token (a Prometheus scraper on a trusted network); every other
    endpoint still wants it."""
    responses_max_stored: Annotated[int, msgspec.Meta(ge=0)] = 1000
    """Responses API answers kept for `previous_response_id` and GET (store=true); the oldest go first."""
    responses_ttl_s: Positive = 3600.0
    """How long a stored response is kept."""
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    """Host names it answers besides IP addresses, localhost, its --host and this machine's name
    (DNS-rebinding protection, rbee_common/browser.py); "*" turns the check off. Read at start."""
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    """Web origins (`https://app.example:8443`) whose pages may call it; every other site's page is
    refused. Read at start."""


class HiveSettings(_Section, frozen=True, kw_only=True):
    """The `rbee-hive` daemon of this machine."""

    host: str = "127.0.0.1"
    port: Port = 9000
    hive_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,64}\Z")] = "localhost"
    queen_url: str | None = None
    data_dir: str | None = None
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1 << 20
    max_live_jobs: Annotated[int, msgspec.Meta(ge=1)] = 64
    job_retention_s: Positive = 600.0
    worker_port_min: Port = 9300
    worker_port_max: Port = 9399
    worker_ready_timeout_s: Positive = 120.0
    """A worker not ready this long after spawn is killed; its last log lines are reported."""
    worker_stop_grace_s: Positive = 5.0
    """`worker_stop` and shutdown: graceful this long, then SIGKILL."""
    worker_heartbeat_s: Annotated[float, msgspec.Meta(ge=0.1, le=60)] = 5.0
    """How often its workers tell the queen they live (and at once when their state changes).
    Keep the queen's worker_stale_s at about three periods."""
    worker_check_s: Positive = 5.0
    """How often the hive checks each worker (`/v1/ready`); 3 failed checks in a row remove it."""
    worker_idle_timeout_s: Annotated[float, msgspec.Meta(ge=0)] = 300.0
    """A worker with no request for this long is stopped (as Ollama's keep_alive); 0 keeps it."""
    evict_idle: bool = True
    """When a spawn lacks threads, RAM or VRAM that idle workers hold, stop the least recently used of
    them (never one with requests, nor one the queen keeps) that free enough, as Ollama unloads an
    idle model for the next; false: refuse the spawn instead."""
    worker_slots: Annotated[int, msgspec.Meta(ge=0, le=256)] = 0
    """Sequences each worker batches on one copy of the model; 0 picks: 4 on a GPU or Metal, on a
    CPU as many as 32,768 tokens of cache hold (4 of 8,192 tokens)."""
    worker_ctx: Annotated[int, msgspec.Meta(ge=0, le=1 << 20)] = 0
    """Context length of each sequence, in tokens (a worker's cache is slots x worker_ctx); 0 picks
    what the model was trained for, at most 32,768, less where memory is short (the spawn says
    what it chose). At least 64 when set."""
    worker_cache_ram: Annotated[int, msgspec.Meta(ge=0, le=1 << 20)] | None = None
    """MiB of host RAM each llama.cpp worker keeps prompt prefixes in once their sequences are
    reused (the worker's --cache-ram); None picks a quarter of the RAM its preflight leaves free, at
    most 8,192 (llama-server's default); 0: none."""
    worker_spin_wait: Literal["auto", "full", "short"] = "auto"
    """How llama.cpp's threads wait between operations (the worker's --spin-wait). auto: short when
    a CPU worker takes every core of the machine (anything else running would stall all its
    threads), full otherwise."""
    worker_binary: str | None = None
    """`llm-worker-rbee` to run (default: the one installed next to this Python)."""
    cpu_threads: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Threads all CPU workers may use together (default: the physical cores)."""
    download_stall_s: Positive = 60.0
    download_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 5
    disk_reserve_bytes: Annotated[int, msgspec.Meta(ge=0)] = 256 << 20
    """Downloads leave at least this much of the data disk free."""
    share_max_bytes_per_s: Annotated[int, msgspec.Meta(ge=0)] = 0
    """The most this hive sends a second to each hive copying a model from it (0: no limit)."""
    audit_max_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 10 * 1024 * 1024
    """The audit log is archived (and its chain continued in a new file) at this size."""
    audit_max_total_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 100 * 1024 * 1024
    """Archived audit logs are deleted, oldest first, beyond this total (the chain records it)."""
    audit_failure_window_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    """Refused authentications from one address are one audit entry per window, with a count; 0
    writes each."""
    audit_key_file: str | None = None
    """The audit chain's HMAC key (default: audit.key in the config dir, made on first use)."""
    model_roots: list[str] = msgspec.field(default_factory=list)
    """Folders a `file://` model may be in, besides the catalog and the built-in model's package."""
    metrics_public: bool = False
    """Serve /metrics without the token (a scraper on a trusted network); its workers' too."""
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    """As the queen's: host names it answers besides addresses, localhost, its host and this
    machine's name."""
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    """As the queen's: web origins whose pages may call it."""
    synthetic_backend: bool = False
    """Benchmarks and tests only: every spawn (backend "auto" or "synthetic", a cold start's too)
    starts a synthetic worker: filler tokens at a fixed rate, no model, any model name."""
    synthetic_slots: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1
    synthetic_tokens_per_s: Annotated[float, msgspec.Meta(gt=0, le=100_000)] = 20.0
    synthetic_prefill_tokens_per_s: Annotated[float, msgspec.Meta(ge=0, le=10_000_000)] = 0.0
    """The synthetic workers' modelled prefill: each prompt token not in their modelled cache
    costs 1/this seconds before the first token (0: free). For routing benchmarks."""
    synthetic_script: str | None = None
    """Tests only: the synthetic workers answer from this JSON file of rules (a test double for
    the model's text, `rbee_worker/backends/synthetic.py`)."""

    def __post_init__(self) -> None:
        if 0 < self.worker_ctx < 64:
            raise ValueError("worker_ctx is 0 (automatic) or at least 64 tokens")


def describe_source(explicit: str | None) -> str:
    """For the config_load/config_reload log lines: the file and the RBEE_* variables that override
    it (names only: a value may be a secret)."""
    path = find_config_file(explicit)
    names = sorted(v for v in os.environ if v.startswith("RBEE_") and "__" in v)
    return f"source={path or 'defaults'}" + (f" env_overrides={','.join(names)}" if names else "")


def changed_fields(old: msgspec.Struct, new: msgspec.Struct) -> list[str]:
    """The fields whose values differ between two settings of one section."""
    return [name for name in old.__struct_fields__ if getattr(old, name) != getattr(new, name)]


class KeeperSettings(_Section, frozen=True, kw_only=True):
    queen_url: str = "http://127.0.0.1:8500"
    queen_start_timeout_s: Positive = 30.0


HOST_PATTERN = (
    r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?|[0-9A-Fa-f:.]{2,45}|\[[0-9A-Fa-f:.]{2,45}\])\Z"
)
"""A host name (letters, digits, '.', '_', '-') or an IPv4/IPv6 address: nothing a shell would read."""
Host = Annotated[str, msgspec.Meta(pattern=HOST_PATTERN)]
User = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9._-]{0,31}\Z")]
CommandPath = Annotated[str, msgspec.Meta(pattern=r"^(~/)?[A-Za-z0-9._/+-]{1,255}\Z")]
"""A program name or path (`python3`, `/usr/bin/python3.11`, `~/py/bin/python`)."""


class HiveEntry(_Section, frozen=True, kw_only=True):
    """A machine whose hive the queen manages.

    Every value that reaches a remote shell is validated here and quoted there.
    """

    host: Host
    ssh_port: Port = 22
    ssh_user: User | None = None
    identity_file: str | None = None
    hive_port: Port = 9000
    install_dir: str = "~/.local/share/rbee/hive"
    python: CommandPath = "python3"
    host_key_policy: Literal["strict", "accept-new"] = "strict"
    """`strict`: the host key must be in the queen's known_hosts; `accept-new`: a first key is recorded."""
    connect_timeout_s: Positive = 10.0
    ssh_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    token_file: str | None = None
    """This hive's API token on the queen's machine (default: the one `hive_install` made)."""
    wheelhouse: str | None = None
    """Wheels for this host, when its platform differs from the queen's."""
    worker_port_min: Port = 9300
    worker_port_max: Port = 9399
    """The hive's worker port range: the queen takes heartbeats only from workers on these ports."""


class ModelSettings(_Section, frozen=True, kw_only=True):
    """What the queen keeps up for one model (`[models.<id>]`), or what a short name stands for."""

    ref: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:/@-]{1,512}\Z")] | None = None
    """Makes the section's name an alias: a request for it is one for this model (a Hub reference
    in any spelling, or a catalog id); `rbee-keeper model alias` writes it."""

    min_workers: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    """Workers of this model the queen keeps running (started at once, again after a crash, never
    stopped for being idle), placed as its replicas are."""


class RbeeConfig(_Section, frozen=True, kw_only=True):
    queen: QueenSettings = QueenSettings()
    hive: HiveSettings = HiveSettings()
    keeper: KeeperSettings = KeeperSettings()
    hives: dict[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,64}\Z")], HiveEntry] = (
        msgspec.field(default_factory=dict)
    )
    models: dict[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:/@-]{1,256}\Z")], ModelSettings] = (
        msgspec.field(default_factory=dict)
    )


# --- writing -----------------------------------------------------------------


def toml_value(value: object) -> str:
    """A TOML value, through one encoder: JSON's strings, numbers, booleans and arrays of them are
    TOML's too (its string escapes included)."""
    scalar = (str, int, float, bool)
    if not (isinstance(value, scalar) or (isinstance(value, list | tuple)
                                          and all(isinstance(item, scalar) for item in value))):
        raise ConfigError(f"A setting of type {type(value).__name__} cannot be written here.",
                          hint="Edit the config file by hand.")
    return msgspec.json.encode(value).decode()


def toml_section(name: str, section: msgspec.Struct) -> str:
    """`[name]` with every field of `section` that differs from its schema's default, in the
    schema's order: what `hive add` and `hive install` write, so neither keeps its own field list."""
    lines = [f"[{name}]"]
    for field in msgspec.structs.fields(section):
        value = getattr(section, field.name)
        if field.default is not msgspec.NODEFAULT:
            default: object = field.default
        elif field.default_factory is not msgspec.NODEFAULT:
            default = field.default_factory()
        else:
            default = msgspec.NODEFAULT  # required: always written
        if value is None or value == default:
            continue
        lines.append(f"{field.encode_name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


# --- where things live -------------------------------------------------------


SYSTEM_CONFIG = Path("/etc/rbee/config.toml")


def find_config_file(
    explicit: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None
) -> Path | None:
    """The file to read, or None when no file exists and defaults hold."""
    environ = dict(os.environ) if environ is None else environ
    chosen = explicit or environ.get("RBEE_CONFIG")
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            source = "--config" if explicit else "$RBEE_CONFIG"
            raise ConfigError(
                f"Config file {path} (from {source}) does not exist.",
                hint="Create it, or point to an existing file.",
            )
        return path
    for candidate in (config_dir() / "config.toml", SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate
    return None


# --- loading -----------------------------------------------------------------

_ENV_ALIASES = {"RBEE_QUEEN_URL": ("keeper", "queen_url")}
_ENV_NOT_KEYS = {"RBEE_CONFIG", "RBEE_API_TOKEN"}


def _known_keys(cls: type[msgspec.Struct]) -> list[str]:
    return [field.encode_name for field in msgspec.structs.fields(cls)]


def _section_type(path: list[str]) -> type[msgspec.Struct] | None:
    """The Struct that holds the key at `path` (None: `path` is not a table)."""
    cls: type[msgspec.Struct] = RbeeConfig
    for index, name in enumerate(path):
        if cls is RbeeConfig and name == "hives":
            return HiveEntry if len(path) == index + 2 else None
        fields = {field.encode_name: field.type for field in msgspec.structs.fields(cls)}
        inner = fields.get(name)
        if not (isinstance(inner, type) and issubclass(inner, msgspec.Struct)):
            return None
        cls = inner
    return cls


def env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """`RBEE_*` variables as a nested dict of raw strings, checked against the schema."""
    tree: dict[str, Any] = {}
    for variable, value in sorted(environ.items()):
        if not variable.startswith("RBEE_") or variable in _ENV_NOT_KEYS:
            continue
        if variable in _ENV_ALIASES:
            path = list(_ENV_ALIASES[variable])
        elif "__" in variable:
            path = [part.lower() for part in variable[len("RBEE_"):].split("__")]
        else:
            continue  # other RBEE_ variables belong to programs, not to the config
        section = _section_type(path[:-1])
        if section is None or path[-1] not in _known_keys(section):
            raise ConfigError(
                f"Environment variable {variable} names no config key.",
                hint="Use RBEE_<SECTION>__<KEY>, for example RBEE_QUEEN__PORT=8600.",
            )
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _explain(error: msgspec.ValidationError, source: str, prefix: str = "") -> ConfigError:
    message, path = describe_validation_error(error)
    if prefix:
        path = f"{prefix}.{path}" if path else prefix
    unknown = message.startswith("Object contains unknown field")
    if unknown:
        field = message.split("`")[1]
        key = f"{path}.{field}" if path else field
        section = _section_type(path.split(".") if path else [])
        known = ", ".join(_known_keys(section)) if section else ""
        return ConfigError(
            f"Unknown key `{key}` in {source}.",
            details={"key": key},
            hint=f"Known keys here: {known}." if known else "Remove it.",
        )
    where = f" for `{path}`" if path else ""
    return ConfigError(f"Bad value{where} in {source}: {message}.", details={"key": path})


def load_config(
    explicit: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None
) -> RbeeConfig:
    environ = dict(os.environ) if environ is None else environ
    path = find_config_file(explicit, environ)
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path} is not valid TOML: {error}.") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"Cannot read config file {path}: {error}.") from None
    source = str(path) if path else "the defaults"
    hives = raw.get("hives")
    for alias, entry in (hives.items() if isinstance(hives, dict) else ()):
        try:  # one by one, so that an error names the hive (msgspec says `hives[...]`)
            msgspec.convert(entry, HiveEntry)
        except msgspec.ValidationError as error:
            raise _explain(error, source, prefix=f"hives.{alias}") from None
    try:
        msgspec.convert(raw, RbeeConfig)  # the file alone, so errors name the file
    except msgspec.ValidationError as error:
        raise _explain(error, source) from None
    overrides = env_overrides(environ)
    try:
        return msgspec.convert(_merge(raw, overrides), RbeeConfig, strict=False)
    except msgspec.ValidationError as error:
        raise _explain(error, "the RBEE_* environment variables") from None
