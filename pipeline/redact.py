"""Passwords out of everything shown: URLs and DSNs as a person may see them.

Settings keep the real URLs (the drivers need them); whatever reaches a status line, a log or
an error message goes through `masked` (one URL) or `redacted` (free text that may hold URLs,
such as a driver's error). A password is replaced by ``***``; the user name, host, port and
path stay, because they are what a reader needs to tell which server was meant.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"

# scheme://user:password@host — the password runs to the last '@' before the host part
# (a password may itself hold '@' or ':'; a host never holds '@').
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s/@:]*:)(?P<pw>[^\s/]*)@")
# key=value passwords in DSNs and query strings: password=..., pass=..., pwd=...
_PARAM = re.compile(r"(?P<head>\b(?:password|passwd|pass|pwd)=)(?P<pw>[^\s&;]+)",
                    re.IGNORECASE)


def masked(url: str | None) -> str:
    """``url`` with any password in it replaced by ``***`` (``None`` gives ``""``)."""
    if not url:
        return ""
    return redacted(url)


def redacted(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with the passwords of every URL in it masked, and each of ``secrets``
    (literal values, such as a configured password) masked wherever it appears."""
    text = _USERINFO.sub(lambda m: m["head"] + (MASK if m["pw"] else "") + "@", text)
    text = _PARAM.sub(lambda m: m["head"] + MASK, text)
    for secret in secrets:
        if secret and len(secret) >= 3:  # a one-letter "password" would mask half the text
            text = text.replace(secret, MASK)
    return text
