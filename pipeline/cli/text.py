"""Text from the data, made safe to print on a terminal.

An insight's text, an item's id or a constellation's name is whatever a JSONL file held. Sent
to a terminal as it is, ``\\x1b[2J`` clears the screen, ``\\x1b]0;...\\x07`` retitles the
window, a carriage return or backspaces overwrite what a line said before, and a bidi
override (U+202E) shows the rest of a line reversed: a row could hide or forge what is
beside it. Every line printer of the CLI passes data through `printable`, which shows those
characters as Python escapes (``\\x1b``, ``\\u202e``); ``--json`` output stays exact, as JSON
escapes them itself.
"""

from __future__ import annotations

# C0 controls and DEL, C1 controls (U+0080-U+009F: 8-bit CSI and OSC on some terminals), the
# bidi embeddings, overrides and isolates, the implicit marks, and the line and paragraph
# separators some terminals break lines at.
_UNSAFE = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x061C, 0x200E, 0x200F,
           *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029]
_ESCAPES = {c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _UNSAFE}
# A backslash itself stays as it is: doubled, every Windows path and every message quoting a
# query's escapes would change, for an ambiguity that hides nothing (an escape shown is inert).
_ESCAPES.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"})


def printable(value: object) -> str:
    """``str(value)`` with every control, bidi and line-breaking character escaped."""
    return str(value).translate(_ESCAPES)
