"""Wire types shared by every rbee program (DESIGN §2).

An *operation* is what a client asks a queen or a hive to do: a JSON object
tagged by ``"operation"`` (snake_case). A *job event* is one ``data:`` line of
a job's SSE stream, tagged by ``"type"``. A stream ends with exactly one
terminator line: ``[DONE]``, ``[ERROR] <message>`` or ``[CANCELLED]``.

New fields always get defaults, and unknown fields are ignored, so peers of
different versions keep talking (msgspec "schema evolution").
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Final, Literal

import msgspec

from rbee_common.errors import ErrorBody

# --- validated scalars -------------------------------------------------------

Ident = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,128}\Z")]
"""Aliases, hive ids and worker ids."""

ModelRef = Annotated[
    str, msgspec.Meta(min_length=1, max_length=512, pattern=r"^[A-Za-z0-9._:/@+=-]+\Z")
]
"""`hf:org/repo[:file]`, `file:///abs/path.gguf` or a catalog id (DESIGN §5)."""

DeviceName = Annotated[str, msgspec.Meta(pattern=r"^(CPU-0|METAL-0|GPU-[0-9]{1,3})\Z")]

Backend = Literal["auto", "llama-cpp", "mlx", "synthetic"]


class _Op(msgspec.Struct, tag_field="operation", frozen=True, kw_only=True):
    """Base of all operations."""

    @property
    def name(self) -> str:
        return str(type(self).__struct_config__.tag)


class _HiveOp(_Op, frozen=True, kw_only=True):
    hive_id: Ident = "localhost"


# --- operations the queen executes ------------------------------------------


class Status(_Op, tag="status", frozen=True, kw_only=True):
    pass


class HiveList(_Op, tag="hive_list", frozen=True, kw_only=True):
    pass


class HiveGet(_HiveOp, tag="hive_get", frozen=True, kw_only=True):
    pass


class HiveInstall(_HiveOp, tag="hive_install", frozen=True, kw_only=True):
    force: bool = False
    """Upload every wheel again and reinstall rbee even when the same version is there."""


class HiveUninstall(_HiveOp, tag="hive_uninstall", frozen=True, kw_only=True):
    purge: bool = False


class HiveStart(_HiveOp, tag="hive_start", frozen=True, kw_only=True):
    detached: bool = False


class HiveStop(_HiveOp, tag="hive_stop", frozen=True, kw_only=True):
    pass


class HiveStatus(_HiveOp, tag="hive_status", frozen=True, kw_only=True):
    pass


class HiveRefreshCapabilities(_HiveOp, tag="hive_refresh_capabilities", frozen=True, kw_only=True):
    pass


class SshTest(_HiveOp, tag="ssh_test", frozen=True, kw_only=True):
    pass


class WorkerListActive(_Op, tag="worker_list_active", frozen=True, kw_only=True):
    model: ModelRef | None = None
    device: DeviceName | None = None
    """Only workers of this model, or on this device."""


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


class GenerationParams(msgspec.Struct, frozen=True, kw_only=True):
    """What to generate and how: shared by `infer` and the worker's request."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int | None = 256
    """None: until the context is full or the model stops (OpenAI's default)."""
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    """llama.cpp's min-p: drop tokens below this fraction of the likeliest one's probability."""
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)
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
    logit_bias: dict[int, float] = msgspec.field(default_factory=dict)
    """Added to a token's logit before sampling (-100 bans it)."""


class Infer(_Op, GenerationParams, tag="infer", frozen=True, kw_only=True):
    model: ModelRef
    hive_id: Ident | None = None


class Embed(_Op, tag="embed", frozen=True, kw_only=True):
    """Vectors for texts, from a worker of `model` (cold-started like any other)."""

    model: ModelRef
    input: Annotated[list[str], msgspec.Meta(min_length=1, max_length=2048)]
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None


# --- operations forwarded to a hive -----------------------------------------


Secret = Annotated[str, msgspec.Meta(min_length=16, max_length=256, pattern=r"^[A-Za-z0-9._~+/=-]+\Z")]


class WorkerSpawn(_HiveOp, tag="worker_spawn", frozen=True, kw_only=True):
    model: ModelRef
    device: DeviceName = "CPU-0"
    backend: Backend = "auto"
    threads: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None = None
    worker_token: Secret | None = None
    """The new worker's own API token, minted by the queen (DESIGN §8: separate tokens). The hive
    hands it to the worker in its environment; without one, a hive with a token mints one."""


class WorkerList(_HiveOp, tag="worker_list", frozen=True, kw_only=True):
    pass


class WorkerGet(_HiveOp, tag="worker_get", frozen=True, kw_only=True):
    worker_id: Ident


class WorkerStop(_HiveOp, tag="worker_stop", frozen=True, kw_only=True):
    worker_id: Ident


class ModelDownload(_HiveOp, tag="model_download", frozen=True, kw_only=True):
    model: ModelRef


class ModelList(_HiveOp, tag="model_list", frozen=True, kw_only=True):
    provider: Literal["hf", "file", "builtin"] | None = None
    """Only models from this source."""


class ModelGet(_HiveOp, tag="model_get", frozen=True, kw_only=True):
    model: ModelRef


class ModelDelete(_HiveOp, tag="model_delete", frozen=True, kw_only=True):
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
)

QUEEN_OPERATIONS: Final = (
    Status, HiveList, HiveGet, HiveInstall, HiveUninstall, HiveStart, HiveStop, HiveStatus,
    HiveRefreshCapabilities, SshTest, WorkerListActive, Infer, Embed,
)
HIVE_OPERATIONS: Final = (
    WorkerSpawn, WorkerList, WorkerGet, WorkerStop, ModelDownload, ModelList, ModelGet, ModelDelete,
)
OPERATION_NAMES: Final[tuple[str, ...]] = tuple(
    str(cls.__struct_config__.tag) for cls in (*QUEEN_OPERATIONS, *HIVE_OPERATIONS)
)

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
    value: Any


JobEvent = Narration | Progress | Token | Result

event_decoder: Final = msgspec.json.Decoder(JobEvent)

DONE: Final = "[DONE]"
ERROR_PREFIX: Final = "[ERROR]"
CANCELLED: Final = "[CANCELLED]"


def is_terminator(data: str) -> bool:
    return data in (DONE, CANCELLED) or data.startswith(ERROR_PREFIX)


# --- results ------------------------------------------------------------------


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
    workers: list[WorkerInfo]


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


class EmbedRequest(msgspec.Struct, frozen=True, kw_only=True):
    """`POST /v1/embeddings` on a worker: one vector per input (a text or token ids)."""

    input: list[str | list[int]]
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Keep the first `dimensions` values and normalize again (Matryoshka truncation)."""


class EmbedResult(msgspec.Struct, frozen=True, kw_only=True):
    data: list[list[float]]
    """Unit-length vectors, in input order."""
    tokens: int


InferenceEvent = InferenceStarted | InferenceToken | InferenceEnd | InferenceError
inference_event_decoder: Final = msgspec.json.Decoder(InferenceEvent)

WorkerState = Literal["loading", "ready", "busy", "draining"]


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


class WorkerInfo(WorkerHeartbeat, frozen=True, kw_only=True):
    """A worker the queen has heard from, and how long ago."""

    last_seen_s: float
    confirmed: bool = True
    """Its hive confirmed it (`worker_get`); the queen routes only to confirmed workers."""
