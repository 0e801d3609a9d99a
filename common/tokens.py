"""Per-client secrets, for deployments without client certificates.

The server reads a file of `CLIENT_ID SECRET` lines (`--client-tokens`); each client sends its secret
in the `authorization: Bearer SECRET` metadata of every call (`--token-file`). Secrets are compared in
constant time. Send them only over TLS: in plaintext anyone on the path can read them.
"""
from __future__ import annotations

import hmac
from pathlib import Path

METADATA_KEY = "authorization"


class TokenError(ValueError):
    pass


def read_tokens(path: str | Path) -> dict[str, str]:
    """{client id: secret} from a file of `ID SECRET` lines (blank lines and # comments ignored)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise TokenError(f"cannot read the client token file {path}: {e.strerror}") from None
    tokens: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) < 16:
            raise TokenError(f"{path} line {number}: expected `CLIENT_ID SECRET` with a secret of 16 or more "
                             "characters (e.g. from `python -c 'import secrets; print(secrets.token_urlsafe())'`)")
        if parts[0] in tokens:
            raise TokenError(f"{path} line {number}: client {parts[0]!r} is listed twice")
        tokens[parts[0]] = parts[1]
    if not tokens:
        raise TokenError(f"{path} lists no clients")
    return tokens


def read_secret(path: str | Path) -> str:
    try:
        secret = Path(path).read_text().strip()
    except OSError as e:
        raise TokenError(f"cannot read the token file {path}: {e.strerror}") from None
    if not secret or len(secret.split()) != 1:
        raise TokenError(f"the token file {path} must hold just this client's secret")
    return secret


def metadata(secret: str) -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, f"Bearer {secret}"),)


def presented(invocation_metadata: tuple) -> str | None:
    for key, value in invocation_metadata or ():
        if key == METADATA_KEY and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):]
    return None


def owner_of(secret: str | None, tokens: dict[str, str]) -> str | None:
    """The client whose secret this is, comparing against every secret in constant time."""
    if secret is None:
        return None
    owner = None
    for client, expected in tokens.items():
        if hmac.compare_digest(secret.encode(), expected.encode()):
            owner = client
    return owner
