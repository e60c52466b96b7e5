"""The queen's HTTP routes: decode, call the service, encode."""

from __future__ import annotations

import platform

import trio
from quart import Response
from quart_trio import QuartTrio

from rbee_common.daemon import build_timestamp, package_version
from rbee_common.http import add_shutdown_route, create_app, json_response
from rbee_common.jobs import JobServer, add_job_routes
from rbee_common.wire import BuildInfo
from rbee_queen.service import QueenService


def build_app(service: QueenService, jobs: JobServer, *, stop: trio.Event) -> QuartTrio:
    app = create_app(
        "queen-rbee", component="queen", max_body_bytes=service.config.settings.max_body_bytes
    )

    @app.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok", "program": "queen-rbee"})

    @app.get("/v1/build-info")
    async def build_info() -> Response:
        return json_response(
            BuildInfo(
                program="queen-rbee",
                version=package_version(),
                features=[],
                build_timestamp=build_timestamp(),
                python=platform.python_version(),
            )
        )

    add_shutdown_route(app, stop)
    add_job_routes(app, jobs)
    return app
