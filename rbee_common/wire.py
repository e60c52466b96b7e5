"""Wire types shared by every rbee program (DESIGN §2).

An *operation* is what a client asks a queen or a hive to do: a JSON object
tagged by ``"operation"`` (snake_case). A *job event* is one ``data:`` line of
a job's SSE stream, tagged by ``"type"``. A stream ends with exactly one
terminator line: ``[DONE]``, ``[ERROR] <message>`` or ``[CANCELLED]``.

Every operation declares the type of its result beside it, as its generic
parameter (`WorkerGet(HiveOp[WorkerRecord])`): `result_type()` reads it, the
job server encodes a handler's return value as that type, and `JobClient.call`
and the hive transports decode into it. Nothing crosses a program boundary as
`Any`.

New fields always get defaults, and unknown fields are ignored, so peers of
different versions keep talking (msgspec "schema evolution").

Past 500 lines on purpose: this is the whole protocol between the four
programs, read top to bottom: records first (operations name them as their
results), then operations, jobs and their events, then the worker's API.
"""

from __future__ import annotations

import functools
import time
import typing
from typing import Annotated, Any, Final, Generic, Literal, TypeVar

import msgspec

from rbee_common.errors import ErrorBody, LimitExceeded, ValidationFailed
from rbee_common.gpus import DEVICE_PATTERN

# --- validated scalars -------------------------------------------------------

PATTERN_WORDS: dict[str, str] = {}
"""A pattern's meaning in words, for errors (`rbee_common.validation`): never the raw regex."""


def _said(pattern: str, words: str) -> str:
    PATTERN_WORDS[pattern] = words
    return pattern


Ident = Annotated[str, msgspec.Meta(pattern=_said(
    r"^[A-Za-z0-9._-]{1,128}\Z", "a name of letters, digits, '.', '_' and '-' (at most 128)"))]
"""Aliases, hive ids and worker ids."""

ModelRef = Annotated[
    str, msgspec.Meta(min_length=1, max_length=512, pattern=_said(
        r"^[A-Za-z0-9._:/@+=-]+\Z", "a model: a catalog id, hf:<org>/<repo>[:<file>] or file:///<path>"))
]
"""`hf:org/repo[:file]`, `file:///abs/path.gguf` or a catalog id (DESIGN §5)."""

DeviceName = Annotated[str, msgspec.Meta(pattern=_said(
    rf"^({DEVICE_PATTERN})\Z",
    "a device: CPU-0, METAL-0, GPU-<n>, or GPUs of one hive as GPU-0,GPU-1"))]
"""One device, or several GPUs of one hive that one worker splits a model over (`GPU-0,GPU-1`)."""

RpcEndpoint = Annotated[str, msgspec.Meta(pattern=_said(r"^127\.0\.0\.1:[0-9]{1,5}\Z", "127.0.0.1:<port>"))]
"""An RPC server as a worker reaches it: a tunnel's end on its own loopback, never a network address."""

Backend = Literal["auto", "llama-cpp", "mlx", "synthetic"]


# --- records: what operations answer -------------------------------------------

WorkerState = Literal["loading", "ready", "busy", "draining"]
"""One vocabulary for the worker, its hive, the queen and the keeper: `loading` until the model
is in memory, `ready` with a free slot, `busy` with none, `draining` once it is stopping."""


class WorkerRecord(msgspec.Struct, kw_only=True):
    """A worker, as its hive, the queen and the keeper see it (`worker_get`, `worker_list`,
    `worker_spawn`, `worker_stop`, `worker_list_active`, `status`)."""

    worker_id: str
    hive_id: str
    model: str
    backend: str
    device: str
    url: str
    pid: int
    state: WorkerState
    slots_total: int = 1
    slots_busy: int = 0
    ctx: int = 0
    """Each sequence's context, in tokens (0: unknown)."""
    threads: int | None = None
    """CPU threads its hive gave it (None where the queen only heard its heartbeat)."""
    port: int | None = None
    started_at: float | None = None
    idle_s: float = 0.0
    """Seconds since its last request, as its hive last saw it."""
    token_sha256: str | None = None
    """SHA-256 of the worker's own API token: the queen checks a heartbeat's token against it."""
    last_seen_s: float | None = None
    """Seconds since the queen last heard its heartbeat (None on a hive's answer)."""
    confirmed: bool | None = None
    """The queen's: its hive confirmed it (`worker_get`), so requests may go to it (None on a hive's
    answer)."""
    tokens_per_s: float | None = None
    """The queen's (`status`): generation speed of its recent requests, a moving average (None
    before its first request through this queen)."""
    helpers: list[str] | None = None
    """Hives whose devices hold part of its layers (llama.cpp RPC through tunnels), if any."""


Provider = Literal["hf", "file", "builtin"]
ModelFormat = Literal["gguf", "mlx"]


class CatalogEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A model in a hive's catalog (`model_download`, `model_list`, `model_get`, `model_delete`)."""

    id: str
    reference: str
    """What was asked for (`hf:org/repo`, …); `id` is what to use afterwards."""
    provider: Provider
    format: ModelFormat
    path: str
    """The GGUF file, or the MLX model directory."""
    size_bytes: int
    files: list[str]
    added_at: float
    source: str | None = None
    """`hf:org/repo:file` with the exact file, and the revision it came from."""
    context_length: int | None = None
    """What the model was trained for (its GGUF header, or config.json), as the hive lists it."""
    sha256: dict[str, str] | None = None
    """Each file's sha256 (hex), as its download verified it: what a copy to another hive checks."""


class Device(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    id: str
    """`CPU-0`, `GPU-<n>` or `METAL-0`: the names `worker_spawn --device` takes."""
    kind: str
    name: str
    memory_total_bytes: int
    memory_free_bytes: int
    cores: int | None = None
    """Physical cores (CPU only)."""
    logical_cores: int | None = None
    compute_capability: str | None = None
    unusable: str | None = None
    """Why llama.cpp cannot use this device here (a GPU beside a llama-cpp-python built without GPU
    offload), with the fix; the scheduler passes it over."""


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What a hive's machine has (`hive_refresh_capabilities`, and the hive's GET /v1/capabilities)."""

    hive_id: str
    devices: list[Device]
    backends: list[str]
    disk_free_bytes: int
    models: int
    workers: int


class HiveHealth(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    hive_id: str
    url: str
    reachable: bool
    problem: str | None = None
    installed: bool | None = None
    """Installed by this queen over SSH (absent for the in-process hive)."""
    attached: bool = False
    """Started by this queen, which holds its SSH session."""
    version: str | None = None


class QueenStatus(msgspec.Struct, frozen=True, kw_only=True):
    version: str
    hives: list[HiveHealth]
    workers: list[WorkerRecord]
    """Their `slots_busy` is the larger of what their last heartbeat said and what the queen has sent
    them and not yet seen finish (a heartbeat lags by up to one period)."""
    queues: dict[str, int] = msgspec.field(default_factory=dict)
    """Model -> requests waiting for a free slot of it (models with none waiting are left out)."""
    oldest_wait_s: dict[str, float] = msgspec.field(default_factory=dict)
    """Model -> how long the first request in its line has waited."""
    added: dict[str, int] = msgspec.field(default_factory=dict)
    """Model -> workers the queen added for its waiting requests (stopped again when idle)."""
    copies: list[CopyUnderWay] = msgspec.field(default_factory=list)
    """Models being copied from one hive to another, through this queen."""


class CopyUnderWay(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    hive_id: str
    from_hive: str
    since_s: float
    """How long ago it started."""


class HiveListing(msgspec.Struct, frozen=True, kw_only=True):
    """One line of `hive_list`."""

    hive_id: str
    url: str
    local: bool
    """Runs inside the queen (--local-hive)."""
    installed: bool | None = None


class HiveDetails(msgspec.Struct, frozen=True, kw_only=True):
    """`hive_get`: a configured hive, without what is private to the queen's machine (its key,
    token and wheelhouse paths)."""

    hive_id: str
    url: str
    local: bool
    host: str
    ssh_port: int
    ssh_user: str | None
    hive_port: int
    install_dir: str
    python: str
    host_key_policy: str
    connect_timeout_s: float
    ssh_attempts: int
    worker_port_min: int
    worker_port_max: int


class SshChecked(msgspec.Struct, frozen=True, kw_only=True):
    """`ssh_test`: SSH to the hive's machine works, and how fast."""

    hive_id: str
    ok: bool
    echo: str
    latency_ms: float
    network_ms: float
    rbee_hive: str | None
    """Where `rbee-hive` is on the host, or None when it is not installed."""


class InstallRecord(msgspec.Struct, frozen=True, kw_only=True):
    """`hive_install`: what was installed where (also the queen's record of it on disk)."""

    hive_id: str
    host: str
    install_dir: str
    """Absolute, on the host."""
    version: str
    python: str
    platform: str
    installed_at: float
    created_dir: bool = True
    """Whether the install made `install_dir` (then uninstall removes all of it)."""


class HiveUninstalled(msgspec.Struct, frozen=True, kw_only=True):
    hive_id: str
    uninstalled: bool
    purged: bool


class HiveStarted(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    hive_id: str
    url: str
    attached: bool
    """This queen holds the hive's SSH session (its lifeline)."""
    already_running: bool = False
    pid: int | None = None


class HiveStopped(msgspec.Struct, frozen=True, kw_only=True):
    hive_id: str
    stopped: bool
    was_running: bool


class InferResult(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    model: str
    worker_id: str
    tokens_in: int
    tokens_out: int
    stop_reason: str
    attempts: int
    tokens_cached: int = 0


class EmbedResult(msgspec.Struct, frozen=True, kw_only=True):
    data: list[list[float]]
    """Unit-length vectors, in input order."""
    tokens: int


# --- operations ---------------------------------------------------------------

R = TypeVar("R", covariant=True)
"""An operation's result type (covariant: a `WorkerGet` is an `Op[object]`)."""

T = TypeVar("T")
"""A result type, in functions that take an `Op[T]` and return its `T`."""


class Op(msgspec.Struct, Generic[R], tag_field="operation", frozen=True, kw_only=True):
    """Base of all operations; `R` is the type of the result."""

    @property
    def name(self) -> str:
        return str(type(self).__struct_config__.tag)

    @classmethod
    def result_type(cls) -> Any:
        """The `R` this operation class declared (a Struct, or a `list` of one)."""
        return _declared_result(cls)

    def decode_result(self, raw: bytes | msgspec.Raw) -> R:
        """The result of this operation from its JSON."""
        return typing.cast(R, msgspec.json.decode(raw, type=self.result_type()))

    def check_result(self, value: object) -> R:
        """`value`, checked to be this operation's result type (a handler's return value)."""
        return typing.cast(R, msgspec.convert(value, self.result_type(), from_attributes=True))


@functools.cache
def _declared_result(cls: type) -> Any:
    for klass in cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            (argument, *_) = typing.get_args(base) or (None,)
            if typing.get_origin(base) in (Op, _HiveOp, HiveOp) and not isinstance(argument, TypeVar):
                return argument
    raise TypeError(f"{cls.__name__} declares no result type")


class _HiveOp(Op[R], frozen=True, kw_only=True):
    """An operation about one hive."""

    hive_id: Ident = "localhost"


class HiveOp(_HiveOp[R], frozen=True, kw_only=True):
    """An operation a hive runs (the queen forwards it to the hive named by `hive_id`)."""


# --- operations the queen executes ------------------------------------------


class Status(Op[QueenStatus], tag="status", frozen=True, kw_only=True):
    pass


class HiveList(Op[list[HiveListing]], tag="hive_list", frozen=True, kw_only=True):
    pass


class HiveGet(_HiveOp[HiveDetails], tag="hive_get", frozen=True, kw_only=True):
    pass


class HiveInstall(_HiveOp[InstallRecord], tag="hive_install", frozen=True, kw_only=True):
    force: bool = False
    """Upload every wheel again and reinstall rbee even when the same version is there."""


class HiveUninstall(_HiveOp[HiveUninstalled], tag="hive_uninstall", frozen=True, kw_only=True):
    purge: bool = False


class HiveStart(_HiveOp[HiveStarted], tag="hive_start", frozen=True, kw_only=True):
    detached: bool = False


class HiveStop(_HiveOp[HiveStopped], tag="hive_stop", frozen=True, kw_only=True):
    pass


class HiveStatus(_HiveOp[HiveHealth], tag="hive_status", frozen=True, kw_only=True):
    pass


class HiveRefreshCapabilities(
    _HiveOp[Capabilities], tag="hive_refresh_capabilities", frozen=True, kw_only=True
):
    pass


class SshTest(_HiveOp[SshChecked], tag="ssh_test", frozen=True, kw_only=True):
    pass


class WorkerListActive(Op[list[WorkerRecord]], tag="worker_list_active", frozen=True, kw_only=True):
    model: ModelRef | None = None
    device: DeviceName | None = None
    """Only workers of this model, or on this device."""


class WorkerScale(Op[list[WorkerRecord]], tag="worker_scale", frozen=True, kw_only=True):
    """At least `replicas` workers of `model` in the fleet, the missing ones placed by the queen (a
    hive with the file, a GPU, the most free memory; one a device): the model's workers after it."""

    model: ModelRef
    replicas: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1


ToolName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}\Z")]


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """A function call the model made: `arguments` is the JSON text of an object."""

    id: str
    name: str
    arguments: str


class Tool(msgspec.Struct, frozen=True, kw_only=True):
    """A function the model may call; `parameters` is a JSON schema of its arguments object."""

    name: ToolName
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class ChatMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)
    """An assistant turn's calls (history sent back by the client)."""
    tool_call_id: str | None = None
    """A `tool` turn: the call this is the result of."""
    name: str | None = None
    """A `tool` turn: the function's name."""


class ResponseFormat(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


MaxTokens = Annotated[int, msgspec.Meta(ge=1)]
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
LogitBias = dict[Annotated[int, msgspec.Meta(ge=0)], Annotated[float, msgspec.Meta(ge=-100, le=100)]]
"""Token id (0 or more) -> a bias between -100 (never) and 100."""


class GenerationParams(msgspec.Struct, frozen=True, kw_only=True):
    """What to generate and how: shared by `infer` and the worker's request. Its ranges are checked
    where it is decoded or converted (`validation.convert_checked`): the queen refuses a bad value
    before any worker is chosen, and the worker's decode checks the same ranges."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: MaxTokens | None = 256
    """A ceiling, not a promise: generation also ends when the worker's context is full or the
    model stops. None: only those (OpenAI's default); a request that says nothing gets 256."""
    temperature: Temperature = 0.7
    top_p: Fraction = 0.95
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 40
    min_p: Fraction = 0.05
    """llama.cpp's min-p: drop tokens below this fraction of the likeliest one's probability."""
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0, le=2)] = 1.0
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    seed: int | None = None
    stop: Annotated[list[str], msgspec.Meta(max_length=4)] = msgspec.field(default_factory=list)
    response_format: ResponseFormat | None = None
    tools: list[Tool] = msgspec.field(default_factory=list)
    """Functions the model may call; the chat template renders them."""
    tool_choice: Literal["auto", "none", "required"] = "auto"
    """`required`: a grammar forces a call matching a tool's parameters schema."""
    tool_name: ToolName | None = None
    """Force a call of this tool (OpenAI's named `tool_choice`)."""
    parallel_tool_calls: bool = True
    """Under `required` or a named tool: the grammar allows a list of calls, not just one."""
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    """Report each token's log-probability and this many likeliest alternatives (None: none)."""
    logit_bias: LogitBias = msgspec.field(default_factory=dict)
    """Added to a token's logit before sampling (-100 bans it)."""
    session: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    """The client's conversation key (`prompt_cache_key`, `user`, Claude Code's session id): prefix
    routing sends a session back to its worker when prefixes do not decide. Never shown to the model."""


def check_tools(params: GenerationParams) -> None:
    """The rules of `tools` and `tool_choice` that no type says, in one place (the queen checks them
    before scheduling, the worker again): distinct names, a named choice among the tools, a
    required call with tools to call, tools only in a chat."""
    names = [tool.name for tool in params.tools]
    if len(set(names)) != len(names):
        raise ValidationFailed("Two tools have the same name.", details={"field": "tools"})
    if params.tool_name is not None and params.tool_name not in names:
        raise ValidationFailed("The tool choice names a function that is not among the tools.",
                               details={"field": "tool_choice"})
    if params.tool_choice == "required" and not names:
        raise ValidationFailed("A call is required but there are no tools.", details={"field": "tool_choice"})
    if (params.tools or params.tool_choice != "auto") and params.messages is None:
        raise ValidationFailed("Tools need `messages` (a chat), not a `prompt`.", details={"field": "tools"})


class Infer(Op[InferResult], GenerationParams, tag="infer", frozen=True, kw_only=True):
    model: ModelRef
    hive_id: Ident | None = None


MAX_EMBED_INPUTS = 2048
"""Inputs in one embedding request, on every route (OpenAI's own cap)."""


class Embed(Op[EmbedResult], tag="embed", frozen=True, kw_only=True):
    """Vectors for texts, from a worker of `model` (cold-started like any other)."""

    model: ModelRef
    input: Annotated[list[str], msgspec.Meta(min_length=1, max_length=MAX_EMBED_INPUTS)]
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None


# --- operations forwarded to a hive -----------------------------------------


Secret = Annotated[str, msgspec.Meta(min_length=16, max_length=256, pattern=r"^[A-Za-z0-9._~+/=-]+\Z")]


class WorkerSpawn(HiveOp[WorkerRecord], tag="worker_spawn", frozen=True, kw_only=True):
    model: ModelRef
    device: DeviceName = "CPU-0"
    backend: Backend = "auto"
    threads: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None = None
    ctx: Annotated[int, msgspec.Meta(ge=64, le=1 << 20)] | None = None
    """Each sequence's context (default: the hive's worker_ctx); the queen asks for more when a
    prompt does not fit its workers but fits the model."""
    worker_token: Secret | None = None
    """The new worker's own API token, minted by the queen (DESIGN §8: separate tokens). The hive
    hands it to the worker in its environment; without one, a hive with a token mints one."""
    keep: bool = False
    """Not stopped by the hive's idle timeout: the queen keeps it (`[models.<id>] min_workers`)."""
    rpc: Annotated[list[RpcEndpoint], msgspec.Meta(max_length=15)] = []
    """llama.cpp RPC servers on other hives that hold part of the layers, each through a tunnel that
    ends on this hive's loopback (the queen opens them: `rbee_queen/fleet/split.py`)."""
    tensor_split: Annotated[list[Annotated[float, msgspec.Meta(gt=0)]], msgspec.Meta(max_length=32)] = []
    """Each device's share of the layers: this hive's (CPU-0, or each GPU of `device`), then each RPC
    server's. Empty: over several GPUs, in proportion to their free VRAM."""
    helpers: Annotated[list[Ident], msgspec.Meta(max_length=15)] = []
    """The hives behind `rpc`, in order (for narration and status)."""


class RpcServer(msgspec.Struct, frozen=True, kw_only=True):
    """A llama.cpp RPC server a hive runs on its loopback, lending a device to a worker elsewhere."""

    server_id: str
    hive_id: str
    device: str
    port: int
    """On 127.0.0.1 of its hive, only."""
    pid: int
    threads: int
    free_bytes: int
    """What its device had free when it started (the queen splits a model in proportion)."""
    started_at: float


class RpcServe(HiveOp[RpcServer], tag="rpc_serve", frozen=True, kw_only=True):
    """Start an RPC server on this hive's loopback for `device` (the queen then tunnels to it)."""

    device: DeviceName | None = None
    """Default: the hive's GPUs that llama.cpp can use there, else its CPU."""
    threads: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None = None
    """CPU threads (default: those CPU workers leave free)."""


class RpcStop(HiveOp[RpcServer], tag="rpc_stop", frozen=True, kw_only=True):
    server_id: Ident


class WorkerList(HiveOp[list[WorkerRecord]], tag="worker_list", frozen=True, kw_only=True):
    pass


class WorkerGet(HiveOp[WorkerRecord], tag="worker_get", frozen=True, kw_only=True):
    worker_id: Ident


class WorkerStop(HiveOp[WorkerRecord], tag="worker_stop", frozen=True, kw_only=True):
    worker_id: Ident


class CopySource(msgspec.Struct, frozen=True, kw_only=True):
    """Where a hive copies a model from instead of the Hub: another hive's files, with a ticket
    that hive gave the queen for this model alone (`model_share`)."""

    url: Annotated[str, msgspec.Meta(pattern=r"^https?://[A-Za-z0-9.:\[\]_-]{1,300}\Z")]
    """The source hive's base URL."""
    hive_id: Ident
    ticket: Secret
    entry: CatalogEntry
    """The source's catalog entry: the files and their sha256."""
    sizes: dict[str, int]
    """Each file's size in bytes."""


class ModelDownload(HiveOp[CatalogEntry], tag="model_download", frozen=True, kw_only=True):
    model: ModelRef
    from_hive: Ident | None = None
    """Copy it from this hive (the queen finds one that has it when not given; the Hub is the
    fallback only when not given)."""
    source: CopySource | None = None
    """Set by the queen for the hive that copies; never by a client."""


class CopyGrant(msgspec.Struct, frozen=True, kw_only=True):
    """What a hive that has a model gives the queen so that another hive can copy it."""

    entry: CatalogEntry
    sizes: dict[str, int]
    """Each file's size in bytes."""
    ticket: Secret
    """Good for this model's files only, for `expires_s`."""
    expires_s: float


class ModelShare(HiveOp[CopyGrant], tag="model_share", frozen=True, kw_only=True):
    """A ticket for another hive to copy a model of this hive's catalog (the queen asks)."""

    model: ModelRef


class ModelList(HiveOp[list[CatalogEntry]], tag="model_list", frozen=True, kw_only=True):
    provider: Literal["hf", "file", "builtin"] | None = None
    """Only models from this source."""


class ModelGet(HiveOp[CatalogEntry], tag="model_get", frozen=True, kw_only=True):
    model: ModelRef


class ModelDelete(HiveOp[CatalogEntry], tag="model_delete", frozen=True, kw_only=True):
    model: ModelRef


Operation = (
    Status
    | HiveList
    | HiveGet
    | HiveInstall
    | HiveUninstall
    | HiveStart
    | HiveStop
    | HiveStatus
    | HiveRefreshCapabilities
    | SshTest
    | WorkerListActive
    | WorkerScale
    | Infer
    | Embed
    | WorkerSpawn
    | WorkerList
    | WorkerGet
    | WorkerStop
    | ModelDownload
    | ModelList
    | ModelGet
    | ModelDelete
    | ModelShare
    | RpcServe
    | RpcStop
)

QUEEN_OPERATIONS: Final = (
    Status, HiveList, HiveGet, HiveInstall, HiveUninstall, HiveStart, HiveStop, HiveStatus,
    HiveRefreshCapabilities, SshTest, WorkerListActive, WorkerScale, Infer, Embed,
)
HIVE_OPERATIONS: Final = (
    WorkerSpawn, WorkerList, WorkerGet, WorkerStop, ModelDownload, ModelList, ModelGet, ModelDelete,
    ModelShare, RpcServe, RpcStop,
)
OPERATION_NAMES: Final[tuple[str, ...]] = tuple(
    str(cls.__struct_config__.tag) for cls in (*QUEEN_OPERATIONS, *HIVE_OPERATIONS)
)

HiveOperation = (
    WorkerSpawn | WorkerList | WorkerGet | WorkerStop | ModelDownload | ModelList | ModelGet | ModelDelete
    | ModelShare | RpcServe | RpcStop
)
"""The operations a hive runs."""

operation_decoder: Final = msgspec.json.Decoder(Operation)


# --- job submission ---------------------------------------------------------


class JobCreated(msgspec.Struct, frozen=True):
    job_id: str
    sse_url: str


JobState = Literal["queued", "running", "completed", "failed", "cancelled"]


class JobInfo(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    operation: str
    state: JobState
    created_at: float
    finished_at: float | None = None
    events: int = 0
    error: ErrorBody | None = None


# --- job events --------------------------------------------------------------


class _Event(msgspec.Struct, tag_field="type", frozen=True, kw_only=True, omit_defaults=True):
    job_id: str = ""
    ts: float = msgspec.field(default_factory=time.time)


class Narration(_Event, tag="narration", frozen=True, kw_only=True, omit_defaults=True):
    actor: str
    action: str
    human: str
    level: Literal["debug", "info", "warn", "error"] = "info"
    fields: dict[str, Any] = msgspec.field(default_factory=dict)
    error: ErrorBody | None = None
    """Set on the narration that precedes an `[ERROR]` terminator, so that a
    client can raise the same error class the server raised."""


class Progress(_Event, tag="progress", frozen=True, kw_only=True, omit_defaults=True):
    what: str
    done: int
    total: int | None = None
    unit: str = "bytes"
    rate: float | None = None


class Token(_Event, tag="token", frozen=True, kw_only=True, omit_defaults=True):
    t: str
    i: int


class Result(_Event, tag="result", frozen=True, kw_only=True, omit_defaults=True):
    value: msgspec.Raw
    """The operation's result, as JSON: `operation.decode_result(value)` types it."""


JobEvent = Narration | Progress | Token | Result

event_decoder: Final = msgspec.json.Decoder(JobEvent)

DONE: Final = "[DONE]"
ERROR_PREFIX: Final = "[ERROR]"
CANCELLED: Final = "[CANCELLED]"


def is_terminator(data: str) -> bool:
    return data in (DONE, CANCELLED) or data.startswith(ERROR_PREFIX)


class BuildInfo(msgspec.Struct, frozen=True, kw_only=True):
    program: str
    version: str
    features: list[str]
    build_timestamp: float | None
    python: str


# --- the worker's inference API (DESIGN §3) -------------------------------------


class InferenceRequest(GenerationParams, frozen=True, kw_only=True):
    request_id: Ident | None = None


class _InferenceEvent(msgspec.Struct, tag_field="type", frozen=True, kw_only=True):
    pass


class InferenceStarted(_InferenceEvent, tag="started", frozen=True, kw_only=True):
    request_id: str
    worker_id: str
    model: str


class TopLogprob(msgspec.Struct, frozen=True, array_like=True):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """One generated token: its text, log-probability, bytes and the likeliest alternatives."""

    token: str
    logprob: float
    bytes: list[int]
    top: list[TopLogprob]


class InferenceToken(_InferenceEvent, tag="token", frozen=True, kw_only=True, omit_defaults=True):
    t: str
    i: int
    lp: list[TokenLogprob] | None = None
    """With `logprobs`: the tokens this piece of text came from."""


StopReason = Literal["stop", "length", "cancelled"]


class InferenceEnd(_InferenceEvent, tag="end", frozen=True, kw_only=True):
    tokens_in: int
    tokens_out: int
    decode_ms: float
    stop_reason: StopReason
    tokens_cached: int = 0
    """Prompt tokens already in the worker's cache (a shared prefix), not decoded again."""
    stop_sequence: str | None = None
    """The stop sequence that ended the answer, when one did."""


class InferenceError(_InferenceEvent, tag="error", frozen=True, kw_only=True):
    code: str
    message: str
    details: dict[str, Any] = msgspec.field(default_factory=dict)
    """The error's details (a refused request's numbers: `CONTEXT_LENGTH_EXCEEDED`'s token counts)."""


MAX_EMBED_TOKENS = 8192
"""Tokens in one embedding request, all inputs together. Measured: 15,600 tokens took 135-148 s on
one CPU thread with the built-in model (about 110 a second), past the queen's 120-s read timeout;
8,192 take about 75 s."""


def check_embed_inputs(inputs: list[str] | list[str | list[int]]) -> None:
    """The one cap on inputs that every embedding route applies (the worker counts tokens)."""
    if len(inputs) > MAX_EMBED_INPUTS:
        raise LimitExceeded(
            f"{len(inputs)} inputs; at most {MAX_EMBED_INPUTS} go in one embedding request.",
            details={"field": "input", "limit": MAX_EMBED_INPUTS},
            hint="Send the inputs in several requests.",
        )


class EmbedRequest(msgspec.Struct, frozen=True, kw_only=True):
    """`POST /v1/embeddings` on a worker: one vector per input (a text or token ids)."""

    input: list[str | list[int]]
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Keep the first `dimensions` values and normalize again (Matryoshka truncation)."""


InferenceEvent = InferenceStarted | InferenceToken | InferenceEnd | InferenceError
inference_event_decoder: Final = msgspec.json.Decoder(InferenceEvent)

class WorkerHeartbeat(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker tells the queen every few seconds (`POST /v1/worker-heartbeat`)."""

    worker_id: Ident
    hive_id: Ident
    url: Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s]{1,256}\Z")]
    model: ModelRef
    backend: Annotated[str, msgspec.Meta(pattern=r"^(auto|llama-cpp|mlx|synthetic)\Z")]
    device: DeviceName
    state: WorkerState
    slots_total: Annotated[int, msgspec.Meta(ge=1)]
    slots_busy: Annotated[int, msgspec.Meta(ge=0)]
    pid: Annotated[int, msgspec.Meta(ge=1)]
    ctx: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Each sequence's context, in tokens (0: not said, an older worker)."""
    prefixes: Annotated[list[int], msgspec.Meta(max_length=4096)] = msgspec.field(default_factory=list)
    """Hashes of the prompt prefixes its sequences and RAM cache hold (`rbee_common.prefixes`),
    the most recently used first; not in the worker's record."""


