"""Running one inference on a worker the scheduler picked, with retries.

A request that fails before its first token (the worker is gone, refuses
with 503, or its stream ends early) is tried on another worker; once a token
has reached the caller it is not, since the caller has seen output. A worker
that cannot be connected to leaves the registry at once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable

import httpx
import msgspec

from rbee_common.errors import ServiceUnavailable, error_from_response
from rbee_common.jobs import JobContext
from rbee_common.wire import (
    DONE,
    GenerationParams,
    InferenceEnd,
    InferenceError,
    InferenceRequest,
    InferenceToken,
    WorkerInfo,
    inference_event_decoder,
)
from rbee_queen.registry import WorkerRegistry
from rbee_queen.scheduler import Scheduler

log = logging.getLogger("rbee.queen.inference")
_encode = msgspec.json.Encoder().encode


class WorkerFailed(ServiceUnavailable):
    code = "WORKER_FAILED"


class _Retry(Exception):
    """The worker failed before any token: try another."""


class Served(msgspec.Struct, kw_only=True):
    """What a finished request reports."""

    worker_id: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    stop_reason: str = "stop"
    attempts: int = 0


async def generate(
    scheduler: Scheduler, registry: WorkerRegistry, http: httpx.AsyncClient, model: str,
    params: GenerationParams, *, attempts: int, context: JobContext | None = None,
    served: Served | None = None, hive_id: str | None = None,
    headers: Callable[[WorkerInfo], dict[str, str]] = lambda worker: {},
) -> AsyncGenerator[str, None]:
    """Text pieces as the worker streams them; `served` is filled in at the end."""
    served = served if served is not None else Served()
    request = InferenceRequest(**{f: getattr(params, f) for f in GenerationParams.__struct_fields__})
    body = _encode(request)
    excluded: set[str] = set()
    for attempt in range(1, attempts + 1):
        worker = await scheduler.acquire(model, context, frozenset(excluded), hive_id)
        served.worker_id, served.attempts = worker.worker_id, attempt
        sent_any = False
        try:
            async with http.stream(
                "POST", f"{worker.url}/v1/inference", content=body,
                headers={"Content-Type": "application/json", **headers(worker)},
                timeout=httpx.Timeout(10.0, read=120.0),
            ) as response:
                if response.status_code == 503:
                    await response.aread()
                    raise _Retry(f"worker answered 503 {response.content[:80]!r}")
                if response.status_code >= 400:
                    await response.aread()
                    raise error_from_response(response.status_code, response.content)
                ended = False
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == DONE:
                        break
                    event = inference_event_decoder.decode(data)
                    if isinstance(event, InferenceToken):
                        sent_any = True
                        yield event.t
                    elif isinstance(event, InferenceEnd):
                        ended = True
                        served.tokens_in, served.tokens_out = event.tokens_in, event.tokens_out
                        served.stop_reason = event.stop_reason
                    elif isinstance(event, InferenceError):
                        if event.code in ("INTERNAL_ERROR",) and not sent_any:
                            raise _Retry(event.message)
                        raise WorkerFailed(event.message, details={"worker_code": event.code})
                if not ended:
                    registry.forget(worker.worker_id, "its stream ended without an end event")
                    if sent_any:
                        raise WorkerFailed(
                            "The worker stopped in the middle of the answer.", code="WORKER_DIED",
                            hint="Retry the request; the queen routes around the failed worker.",
                        )
                    raise _Retry("stream ended before any token")
                return
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            registry.forget(worker.worker_id, f"connection failed ({type(error).__name__})")
            failure = f"connection failed ({type(error).__name__})"
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout) as error:
            # Out of routing until its next heartbeat says it lives.
            registry.forget(worker.worker_id, f"its stream broke ({type(error).__name__})")
            if sent_any:
                raise WorkerFailed(
                    "The worker stopped in the middle of the answer.", code="WORKER_DIED",
                    hint="Retry the request; the queen routes around the failed worker.",
                ) from error
            failure = f"stream broke ({type(error).__name__})"
        except _Retry as retry:
            failure = str(retry)
        finally:
            scheduler.release(worker.worker_id)
        excluded.add(worker.worker_id)
        log.warning("request failed on worker %s before its first token (%s); attempt %d of %d",
                    worker.worker_id, failure, attempt, attempts)
        if context is not None:
            context.narrate("retry", f"Worker {worker.worker_id} failed before the first token; retrying",
                            level="warn", worker_id=worker.worker_id)
    raise WorkerFailed(
        f"The request failed on {attempts} worker(s) before producing a token.",
        hint="Check the workers (`worker_list_active`) and the hives' logs.",
    )

