"""What a web browser on the operator's machine may make a daemon do: nothing but same-origin.

Any page the operator opens can send requests to loopback. A `<form>` or a
`no-cors` fetch POSTs `text/plain` or form bodies cross-site without a
preflight, and a DNS-rebinding page (its name re-pointed at 127.0.0.1) can
even read the answers, with the attacker's name in `Host`. So every daemon
(queen, hive, worker), with or without a token:

- answers only requests whose `Host` names it: an IP literal (a rebinding
  page has a name, never an address), `localhost` or `*.localhost`, the
  address it was told to bind, this machine's hostname, or one listed in
  `allowed_hosts` (`"*"` lists all);
- refuses a request that carries an `Origin` other than its own (the page
  that made it is another site's), unless that origin is in
  `allowed_origins`; `Origin: null` (a sandboxed page, a file) is foreign;
- takes POST bodies only as JSON (`application/json`, or `application/*+json`),
  which a browser cannot send cross-site without a CORS preflight, and no
  daemon answers one.

SDKs and `curl` send no `Origin` and a JSON content type; the dashboard is
same-origin. The checks are pure functions; `install_browser_guard` hangs them
on an app.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from urllib.parse import urlsplit

import msgspec
from quart import request
from quart_trio import QuartTrio

from rbee_common.errors import HostRefused, OriginRefused, UnsupportedMediaType
from rbee_common.validation import quote

log = logging.getLogger("rbee.browser")

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BrowserGuard(msgspec.Struct, frozen=True, kw_only=True):
    bind_host: str = "127.0.0.1"
    """The address the daemon was told to listen on (its own name for itself)."""
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()


def _split_host(value: str) -> tuple[str, int | None] | None:
    """`name:port`, `[v6]:port` or a bare name, as (lowercase name, port); None if malformed."""
    value = value.strip()
    if not value or any(c.isspace() or c in "/@?#\\" for c in value):
        return None
    try:
        parts = urlsplit(f"//{value}")
        port = parts.port
    except ValueError:
        return None
    name = (parts.hostname or "").rstrip(".").lower()
    return (name, port) if name else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def own_names() -> frozenset[str]:
    """This machine's names for itself, as a LAN's DNS or /etc/hosts gives them out."""
    names = {socket.gethostname().lower()}
    with contextlib.suppress(OSError):
        names.add(socket.getfqdn().lower())
    return frozenset(name.rstrip(".") for name in names if name)


_OWN = own_names()


def host_allowed(host_header: str | None, guard: BrowserGuard) -> bool:
    if host_header is None:
        return True  # HTTP/1.0 without Host (HTTP/2's :authority always fills it): no rebinding page
    split = _split_host(host_header)
    if split is None:
        return False
    name = split[0]
    listed = {h.lower().rstrip(".") for h in guard.allowed_hosts}
    if "*" in listed:
        return True
    return (
        _is_ip(name) or name == "localhost" or name.endswith(".localhost")
        or name == guard.bind_host.strip("[]").lower().rstrip(".") or name in _OWN or name in listed
    )


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) with the scheme's default port filled in; None for `null` or junk."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        return None
    return parts.scheme, parts.hostname.lower().rstrip("."), port or (443 if parts.scheme == "https" else 80)


def origin_allowed(origin: str | None, host_header: str | None, guard: BrowserGuard) -> bool:
    """A request without `Origin` is not a cross-site one (browsers send it on every POST and on
    every cross-origin fetch); with one, it must be this daemon's own origin or a listed one."""
    if origin is None:
        return True
    if "*" in guard.allowed_origins:
        return True
    key = _origin_key(origin)
    if key is None:
        return False
    if any(_origin_key(listed) == key for listed in guard.allowed_origins):
        return True
    split = _split_host(host_header or "")
    if split is None or not host_allowed(host_header, guard):
        return False
    scheme, name, port = key
    return (name, port) == (split[0], split[1] or (443 if scheme == "https" else 80))


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def install_browser_guard(app: QuartTrio, guard: BrowserGuard) -> None:
    """Refuse foreign `Host` and `Origin` first of all (before auth, on every route, `/health`
    too): a 403 that names the header and the setting that would allow it."""

    @app.before_request
    async def _same_origin_only() -> None:
        host = request.headers.get("Host")
        if not host_allowed(host, guard):
            log.warning("refused a request for another host path=%r host=%r", request.path, quote(host or ""))
            raise HostRefused(
                "This daemon does not answer requests addressed to that host name (DNS rebinding "
                "protection).",
                hint="Address it by IP or localhost, or list the name in allowed_hosts of its config "
                     "section ([queen] or [hive]).",
            )
        origin = request.headers.get("Origin")
        if not origin_allowed(origin, host, guard):
            log.warning("refused a cross-site request path=%r origin=%r", request.path, quote(origin or ""))
            raise OriginRefused(
                "Requests from web pages of other sites are refused.",
                hint="Call the API from a program (no Origin header), or list the page's origin in "
                     "allowed_origins of the daemon's config section ([queen] or [hive]).",
            )


def install_json_only(app: QuartTrio) -> None:
    """Every POST (PUT, PATCH) must say its body is JSON: what a form or a `no-cors` fetch sends
    (`text/plain`, form encodings) is refused unread. Install it after auth, so a stranger still
    gets 401 first."""

    @app.before_request
    async def _json_bodies_only() -> None:
        if request.method not in BODY_METHODS:
            return
        if not is_json(request.headers.get("Content-Type")):
            raise UnsupportedMediaType(
                "Request bodies must be JSON.", details={"header": "Content-Type"},
                hint="Send Content-Type: application/json with a JSON body.",
            )
