"""The queen's HTTP routes: decode, call the service, encode."""

from __future__ import annotations

import platform

import trio
from quart import Response, request
from quart_trio import QuartTrio

from rbee_common.auth import install_auth, presented_token
from rbee_common.browser import BrowserGuard, install_json_only
from rbee_common.daemon import build_timestamp, package_version
from rbee_common.errors import AuthFailed, RbeeError
from rbee_common.http import add_shutdown_route, create_app, json_response, no_content, read_body
from rbee_common.jobs import JobServer, add_job_routes
from rbee_common.webui import add_ui_routes
from rbee_common.wire import BuildInfo
from rbee_queen.dialects.anthropic.routes import add_anthropic_routes
from rbee_queen.dialects.ollama.routes import add_ollama_routes
from rbee_queen.dialects.openai.routes import add_openai_routes
from rbee_queen.dialects.responses.routes import add_responses_routes
from rbee_queen.service import QueenService


def build_app(service: QueenService, jobs: JobServer, *, stop: trio.Event) -> QuartTrio:
    settings = service.config.settings
    guard = BrowserGuard(bind_host=settings.host, allowed_hosts=tuple(settings.allowed_hosts),
                         allowed_origins=tuple(settings.allowed_origins))
    app = create_app("queen-rbee", component="queen", max_body_bytes=settings.max_body_bytes, guard=guard)
    metrics = service.metrics.install(app, public=service.config.settings.metrics_public,
                                      also=lambda: [hive.metrics for hive in service.local_hives])
    pages = add_ui_routes(app, "rbee_queen")
    install_auth(app, service.tokens, own_check=("/v1/worker-heartbeat",),
                 public=("/health", *pages, *metrics),
                 on_success=service.audit_auth_success, on_failure=service.audit_auth_failure)
    install_json_only(app)

    @app.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok", "program": "queen-rbee"})

    @app.get("/v1/build-info")
    async def build_info() -> Response:
        return json_response(
            BuildInfo(
                program="queen-rbee",
                version=package_version(),
                features=["local-hive"] if service.in_process_hive else [],
                build_timestamp=build_timestamp(),
                python=platform.python_version(),
            )
        )

    @app.post("/v1/worker-heartbeat")
    async def worker_heartbeat() -> Response:
        # The Authorization header was checked for form before this (install_auth); which
        # credential it is depends on the worker (rbee_queen/heartbeats.py).
        token = presented_token() if service.token is not None else None
        try:
            await service.heartbeats.accept(await read_body(), token)
        except RbeeError as error:
            service.metrics.heartbeats.labels("refused").inc()
            if isinstance(error, AuthFailed):
                service.audit_auth_failure(error.reason, error.identity, request.path)
            raise
        service.metrics.heartbeats.labels("accepted").inc()
        return no_content()

    def default_deadline_s() -> float:
        return service.config.settings.default_deadline_s

    add_openai_routes(app, generate=service.generate, list_models=service.models, embed=service.embed,
                      default_deadline_s=default_deadline_s, streams=service.streams)
    add_anthropic_routes(app, generate=service.generate, count_tokens=service.count_tokens,
                         default_deadline_s=default_deadline_s, streams=service.streams)
    add_responses_routes(app, generate=service.generate, store=service.responses,
                         default_deadline_s=default_deadline_s, streams=service.streams)
    add_ollama_routes(app, generate=service.generate, embed=service.embed, catalogs=service.catalogs,
                      workers=service.workers.active, jobs=jobs, default_deadline_s=default_deadline_s,
                      streams=service.streams)
    add_shutdown_route(app, stop)
    add_job_routes(app, jobs)
    return app
