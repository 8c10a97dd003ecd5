"""The API's bearer tokens: one that may read, one that may also write, kept in the state dir.

Each is made on first use (`token`) from 32 random bytes, and kept in ``tokens.json`` in the
state dir, owner-only (0600) like everything there. `moe-pipeline token` prints the read token
and ``--write`` the write token; ``--revoke`` replaces one, so the old one stops working at
the next request. Requests are checked in constant time (`scope_of`); a token is never
logged or returned by the API.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from pathlib import Path

from pipeline.errors import PipelineError

FILE = "tokens.json"
SCOPES = ("read", "write")


def _path(state_dir: Path) -> Path:
    return Path(state_dir) / FILE


def _load(state_dir: Path) -> dict[str, str]:
    try:
        found = json.loads(_path(state_dir).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise PipelineError(f"{_path(state_dir)}: unreadable ({err}); remove it and run "
                            "moe-pipeline token again") from err
    return {k: v for k, v in found.items() if k in SCOPES and isinstance(v, str) and v}


def _save(state_dir: Path, tokens: dict[str, str]) -> None:
    path = _path(state_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f"{FILE}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(tokens, f)
    os.replace(tmp, path)


def token(state_dir: Path, scope: str = "read", revoke: bool = False) -> str:
    """The token of ``scope``, made now if there is none (or if ``revoke``)."""
    if scope not in SCOPES:
        raise PipelineError(f"token scope {scope!r}: one of {', '.join(SCOPES)}")
    tokens = _load(state_dir)
    if revoke or scope not in tokens:
        tokens[scope] = f"moe_{scope[0]}_{secrets.token_urlsafe(32)}"
        _save(state_dir, tokens)
    return tokens[scope]


def scope_of(state_dir: Path, presented: str | None) -> str | None:
    """The scope a presented token grants ("write" includes reading), None for none."""
    if not presented:
        return None
    tokens = _load(state_dir)
    granted = None
    for scope in SCOPES:  # every comparison made, in constant time each
        known = tokens.get(scope)
        if known and hmac.compare_digest(known.encode(), presented.encode()):
            granted = scope
    return granted


def ensure(state_dir: Path) -> None:
    """Both tokens exist (a server makes them at start, so a client can ask for them)."""
    for scope in SCOPES:
        token(state_dir, scope)
