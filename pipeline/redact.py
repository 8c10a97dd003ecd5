"""Passwords out of everything shown: URLs and DSNs as a person may see them.

Settings keep the real URLs (the drivers need them); whatever reaches a status line, a log or
an error message goes through `masked` (one URL) or `redacted` (free text that may hold URLs,
such as a driver's error). A password is replaced by ``***``; the user name, host, port and
path stay, because they are what a reader needs to tell which server was meant.

A password may hold any character, ``/``, ``@``, ``:`` and spaces included (SQLAlchemy and
redis-py take them unescaped), so the password of a URL runs from the first ``:`` after the
scheme's ``//`` to the *last* ``@``. In free text a URL ends at whitespace; a password with a
space in it is masked there because `redacted` is also given the configured passwords
themselves (`Settings.secrets`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"

_SCHEME = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<rest>.*)$", re.S)
# In free text: scheme://user:password@ where the password runs to the last '@' of the token.
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:@/]*:)(?P<pw>\S*)@")
# key=value passwords in DSNs and query strings: password=..., pass=..., pwd=...
_PARAM = re.compile(r"(?P<head>\b(?:password|passwd|pass|pwd)=)(?P<pw>[^\s&;]+)",
                    re.IGNORECASE)


def userinfo(url: str) -> tuple[str, str | None] | None:
    """``(user, password)`` of a URL that holds a user part, else None (``password`` None
    when only a user is given)."""
    m = _SCHEME.match(url)
    if not m:
        return None
    rest = m["rest"]
    at = rest.rfind("@")
    if at < 0:
        return None
    user, colon, password = rest[:at].partition(":")
    return user, (password if colon else None)


def masked(url: str | None) -> str:
    """``url`` with any password in it replaced by ``***`` (``None`` gives ``""``)."""
    if not url:
        return ""
    found = userinfo(url)
    # userinfo found a password, so the scheme matched.
    if found is not None and found[1] and (m := _SCHEME.match(url)):
        url = f"{m['scheme']}{found[0]}:{MASK}@{m['rest'][m['rest'].rfind('@') + 1:]}"
    return _PARAM.sub(lambda p: p["head"] + MASK, url)


def url_password(url: str | None) -> str | None:
    """The password written in ``url``, if any (to mask it wherever it turns up)."""
    found = userinfo(url) if url else None
    return found[1] if found else None


def redacted(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with the passwords of every URL in it masked, and each of ``secrets``
    (literal values, such as a configured password) masked wherever it appears."""
    # A driver that misparses a URL quotes pieces of its password (redis-py: "Port could
    # not be cast to integer value as 'pa'" for "pa/ss"), so the pieces are masked too.
    pieces = {p for s in secrets if s for p in re.split(r"[/:@?#\s]+", s) if len(p) >= 4}
    # Longest first: a secret that contains another is masked whole.
    for secret in sorted({s for s in secrets if s and len(s) >= 3} | pieces, key=len,
                         reverse=True):
        text = text.replace(secret, MASK)  # a one-letter "password" would mask half the text
    text = _USERINFO.sub(lambda m: m["head"] + (MASK if m["pw"] else "") + "@", text)
    return _PARAM.sub(lambda m: m["head"] + MASK, text)
