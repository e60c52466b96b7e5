"""The hive's HTTP routes: decode, call the service, encode."""

from __future__ import annotations

import trio
from quart import Response
from quart_trio import QuartTrio

from rbee_common.auth import TokenSource, install_auth, request_source
from rbee_common.browser import BrowserGuard, install_json_only
from rbee_common.daemon import package_version
from rbee_common.http import add_shutdown_route, create_app, json_response
from rbee_common.jobs import JobServer, add_job_routes
from rbee_common.webui import add_ui_routes
from rbee_hive.service import HiveService
from rbee_hive.sharing import add_file_route


def build_app(
    service: HiveService, jobs: JobServer, *, stop: trio.Event, token: str | TokenSource | None = None
) -> QuartTrio:
    settings = service.settings
    guard = BrowserGuard(bind_host=settings.host, allowed_hosts=tuple(settings.allowed_hosts),
                         allowed_origins=tuple(settings.allowed_origins))
    app = create_app("rbee-hive", component="hive", max_body_bytes=settings.max_body_bytes, guard=guard)
    metrics = service.metrics.install(app, public=service.settings.metrics_public)
    pages = add_ui_routes(app, "rbee_hive")

    def refused(reason: str, identity: str | None, path: str) -> None:
        service.metrics.auth_failed(reason)
        service.auth_failures.refused(request_source(), reason, identity, path)

    install_auth(
        app, token, public=("/health", *pages, *metrics), own_check=("/v1/models/",),
        on_success=lambda identity: service.audit.record("auth.success", actor=identity, outcome="ok"),
        on_failure=refused,
    )
    install_json_only(app)

    @app.get("/health")
    async def health() -> Response:
        return json_response({
            "status": "ok", "program": "rbee-hive", "hive_id": service.settings.hive_id,
            "version": package_version(), "api_version": "v1",
        })

    @app.get("/v1/capabilities")
    async def capabilities() -> Response:
        return json_response(await trio.to_thread.run_sync(service.capabilities))

    add_file_route(app, service.catalog, service.tickets,
                   token if isinstance(token, TokenSource) else TokenSource.fixed(token),
                   lambda: service.settings.share_max_bytes_per_s)
    add_shutdown_route(app, stop)
    add_job_routes(app, jobs)
    return app
