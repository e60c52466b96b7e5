"""Bearer tokens (DESIGN §8): loading them, checking them, never showing them.

A daemon accepts a token from `--api-token-file PATH` (one line, at least 16
characters, mode 0600 or stricter), else from `$RBEE_API_TOKEN`. With no
token it serves only on loopback ("dev mode"); a non-loopback bind without
one refuses to start. With a token, every endpoint but `/health` wants
`Authorization: Bearer <token>`, compared in constant time. Logs name a token
by its fingerprint (the first 6 hex characters of its SHA-256), never by
itself.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from quart import Response, g, request
from quart_trio import QuartTrio

from rbee_common.errors import AuthFailed, ConfigError, InvalidApiKey, InvalidAuthFormat, MissingApiKey

MIN_TOKEN_CHARS = 16
TOKEN_ENV = "RBEE_API_TOKEN"

log = logging.getLogger("rbee.auth")


def token_sha256(token: str) -> str:
    """A token's SHA-256 (hex): safe to pass around, and what a hive and the queen compare."""
    return hashlib.sha256(token.encode()).hexdigest()


def fingerprint(token: str) -> str:
    return token_sha256(token)[:6]


def new_token() -> str:
    return secrets.token_urlsafe(32)


_CREATE = "Create it: one line, mode 0600."
_READABLE = "Make it readable by this user (chmod 600, owned by this user)."
_ONE_TOKEN = "Put one token of at least 16 characters in it."


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in `path`; errors name the path and the fix, never the content."""
    file = Path(path).expanduser()
    try:
        info = file.stat()
    except FileNotFoundError:
        raise ConfigError(f"API token file not found: {file}.", hint=_CREATE) from None
    except PermissionError:
        raise ConfigError(f"API token file {file}: permission denied.", hint=_READABLE) from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"API token file {file} has insecure permissions {stat.S_IMODE(info.st_mode):04o}; "
            "expected 0600.",
            hint=f"chmod 600 {file}",
        )
    try:
        text = file.read_text(encoding="utf-8")
    except PermissionError:
        raise ConfigError(f"API token file {file}: permission denied.", hint=_READABLE) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"Cannot read API token file {file}: {type(error).__name__}.") from None
    return _check(text.rstrip("\r\n"), f"API token file {file}")


_read: dict[Path, tuple[tuple[int, int, int], str]] = {}


def cached_token_file(path: str | os.PathLike[str]) -> str:
    """`read_token_file`, read again only when the file's mtime, size or mode change."""
    file = Path(path).expanduser()
    try:
        info = file.stat()
    except OSError:
        return read_token_file(file)  # raises, with the path and the fix
    key = (info.st_mtime_ns, info.st_size, info.st_mode)
    hit = _read.get(file)
    if hit is not None and hit[0] == key:
        return hit[1]
    token = read_token_file(file)
    _read[file] = (key, token)
    return token


def _check(token: str, source: str) -> str:
    if not token:
        raise ConfigError(f"{source} is empty.", hint=_ONE_TOKEN)
    if not token.strip():
        raise ConfigError(f"{source} contains only whitespace.", hint=_ONE_TOKEN)
    if "\n" in token or "\r" in token:
        raise ConfigError(f"{source} must contain exactly one line.", hint="Keep only the token in it.")
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"{source} holds a token shorter than {MIN_TOKEN_CHARS} characters.",
            hint="Make a longer one: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'",
        )
    return token


def load_token(
    path: str | os.PathLike[str] | None, environ: dict[str, str] | None = None
) -> str | None:
    """The token a daemon accepts: the file if given, else systemd's credential `api_token`
    (`$CREDENTIALS_DIRECTORY`, from `LoadCredential=`), else `$RBEE_API_TOKEN`, else None."""
    if path is not None:
        return read_token_file(path)
    environ = dict(os.environ) if environ is None else environ
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / "api_token").exists():
        return read_token_file(Path(credentials) / "api_token")
    value = environ.get(TOKEN_ENV)
    return _check(value.rstrip("\r\n"), f"${TOKEN_ENV}") if value is not None else None


class TokenSource:
    """The token a daemon accepts now: loaded at start, read again on SIGHUP (`reload`).

    A reload that fails (a missing file, bad mode, empty) is logged and keeps
    the old token, so a slip while rotating never locks everyone out. Open
    streams are not touched: a token is checked when a request starts.
    """

    def __init__(self, path: str | os.PathLike[str] | None, environ: dict[str, str] | None = None) -> None:
        self.current = load_token(path, environ)
        credentials = (os.environ if environ is None else environ).get("CREDENTIALS_DIRECTORY")
        if path is None and credentials and (Path(credentials) / "api_token").exists():
            path = Path(credentials) / "api_token"  # systemd's credential: reloaded like a file
        self.path = path

    @classmethod
    def fixed(cls, token: str | None, path: str | os.PathLike[str] | None = None) -> TokenSource:
        """A source already loaded (`token`), which `reload` reads from `path` if given."""
        source = cls.__new__(cls)
        source.path, source.current = path, token
        return source

    def reload(self) -> bool:
        _read.clear()  # hives' token files too: read them again on next use
        if self.path is None:
            log.info("SIGHUP: no API token file to reload (the token came from the environment or none)")
            return False
        try:
            token = read_token_file(self.path)
        except ConfigError as error:
            log.warning("API token not reloaded, the old one stays: %s", error.message)
            return False
        self.current = token
        log.info("API token reloaded identity=token:%s", fingerprint(token))
        return True


def write_token_file(path: Path, token: str) -> None:
    """Write `token` to `path` with mode 0600 from the start (never readable by others).

    The temporary file is created with O_EXCL, so a file or symlink someone
    left at its name is never written through.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    os.replace(temporary, path)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_token_for_bind(host: str, token: str | None, program: str) -> None:
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"API token required for non-loopback bind ({program} on {host}).",
            hint=f"Give --api-token-file PATH (one line, mode 0600, at least 16 characters), "
                 f"or set ${TOKEN_ENV}, or bind 127.0.0.1.",
        )


def request_identity() -> str:
    """Who this request is, for the audit log: a token fingerprint, or loopback in dev mode."""
    identity = getattr(g, "identity", None)
    return identity if isinstance(identity, str) else "loopback (no token)"


def request_source() -> str:
    """The address this request came from (the audit log counts refusals per source)."""
    address = request.remote_addr
    return address if isinstance(address, str) and address else "unknown"


def bearer(token: str | None) -> dict[str, str]:
    """The header a client sends: none when there is no token."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def presented_token() -> str:
    """The token in this request's Authorization header (or `x-api-key`, as Anthropic's clients send
    it), or Unauthorized (with the reason)."""
    header = request.headers.get("Authorization")
    if header is None and request.headers.get("x-api-key"):  # Anthropic's clients send theirs here
        return str(request.headers["x-api-key"])
    if header is None:
        raise _refuse(MissingApiKey, "Missing API key", "missing_header")
    if header.strip() == "Bearer":  # "Bearer " with nothing after it (HTTP strips the trailing space)
        raise _refuse(MissingApiKey, "Missing API key", "empty_token")
    if not header.startswith("Bearer "):  # the scheme is case-sensitive, one space
        raise _refuse(InvalidAuthFormat, "Invalid Authorization header format", "invalid_format")
    token = header[len("Bearer "):]
    if not token.strip():
        raise _refuse(MissingApiKey, "Missing API key", "empty_token")
    return token


def matches(token: str, accepted: Iterable[str]) -> bool:
    found = False
    for candidate in accepted:  # compare with each one: the time does not tell which matched
        found |= hmac.compare_digest(token.encode(), candidate.encode())
    return found



def _refuse(kind: type[AuthFailed], message: str, reason: str, token: str | None = None) -> AuthFailed:
    identity = f" identity=token:{fingerprint(token)}" if token else ""
    log.warning("auth failed reason=%s path=%r%s", reason, request.path, identity)
    error = kind(message, hint="Send Authorization: Bearer <token>.")
    error.reason, error.identity = reason, f"token:{fingerprint(token)}" if token else None
    return error


def refuse_token(token: str | None) -> AuthFailed:
    """The 401 for a presented token that no credential matches."""
    return _refuse(InvalidApiKey, "Invalid or missing API key", "invalid_token", token)


def install_auth(
    app: QuartTrio, token: str | TokenSource | None, *, public: Iterable[str] = ("/health",),
    own_check: Iterable[str] = (), on_success: Callable[[str], None] | None = None,
    on_failure: Callable[[str, str | None, str], None] | None = None,
) -> None:
    """Require the token on every route but `public` ones.

    `own_check` routes (a path, or a prefix ending in `/`) accept other credentials and check
    them themselves; the
    header must still be there and well formed, for every method, before any
    body is read (401 first, never 400 or 405 to a stranger). `on_success` and
    `on_failure` see each outcome (the audit log): a fingerprint, never a token.
    """
    source = token if isinstance(token, TokenSource) else TokenSource.fixed(token)

    @app.after_request
    async def _challenge(response: Response) -> Response:
        if response.status_code == 401:
            response.headers.setdefault("WWW-Authenticate", "Bearer")
        return response

    if source.current is None:
        log.info("no API token: dev mode, loopback only")
        return
    seen: set[str] = set()
    log.info("API token loaded identity=token:%s", fingerprint(source.current))
    skip = set(public)
    own = set(own_check)

    @app.before_request
    async def _authenticate() -> Response | None:
        if request.path in skip or source.current is None:
            return None
        try:
            presented = presented_token()
            if request.path in own or any(p.endswith("/") and request.path.startswith(p) for p in own):
                return None
            if not matches(presented, (source.current,)):
                raise refuse_token(presented)
        except AuthFailed as error:
            if on_failure is not None:
                on_failure(error.reason, error.identity, request.path)
            raise
        identity = f"token:{fingerprint(presented)}"
        g.identity = identity
        if identity not in seen:  # once per token and process: the log is not a request log
            seen.add(identity)
            log.info("authenticated identity=%s", identity)
            if on_success is not None:
                on_success(identity)
        return None
