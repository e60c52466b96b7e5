"""The queen's HTTP routes: decode, call the service, encode."""

from __future__ import annotations

import platform

import msgspec
import trio
from quart import Response
from quart_trio import QuartTrio

from rbee_common.auth import check_request, install_auth
from rbee_common.daemon import build_timestamp, package_version
from rbee_common.errors import NotFound
from rbee_common.http import add_shutdown_route, create_app, json_response, no_content, read_body
from rbee_common.jobs import JobServer, add_job_routes
from rbee_common.validation import decode_body
from rbee_common.wire import BuildInfo, WorkerHeartbeat
from rbee_queen.openai_api import add_openai_routes
from rbee_queen.service import QueenService

_heartbeat_decoder = msgspec.json.Decoder(WorkerHeartbeat)


def build_app(service: QueenService, jobs: JobServer, *, stop: trio.Event) -> QuartTrio:
    app = create_app(
        "queen-rbee", component="queen", max_body_bytes=service.config.settings.max_body_bytes
    )
    install_auth(app, service.token, own_check=("/v1/worker-heartbeat",))

    @app.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok", "program": "queen-rbee"})

    @app.get("/v1/build-info")
    async def build_info() -> Response:
        return json_response(
            BuildInfo(
                program="queen-rbee",
                version=package_version(),
                features=["local-hive"] if service.local_hive is not None else [],
                build_timestamp=build_timestamp(),
                python=platform.python_version(),
            )
        )

    @app.post("/v1/worker-heartbeat")
    async def worker_heartbeat() -> Response:
        beat = decode_body(await read_body(), _heartbeat_decoder)
        if service.token is not None:  # a worker presents our token or its hive's
            check_request(service.heartbeat_tokens(beat.hive_id))
        if beat.hive_id not in service.config.hives:
            raise NotFound(
                "That worker's hive is not configured on this queen.", code="HIVE_NOT_FOUND",
                hint="Add it under [hives.<id>] in the queen's config.",
            )
        service.workers.record(beat)
        return no_content()

    add_openai_routes(app, generate=service.generate, list_models=service.model_names)
    add_shutdown_route(app, stop)
    add_job_routes(app, jobs)
    return app
