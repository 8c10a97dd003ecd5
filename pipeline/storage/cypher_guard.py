"""What a user's read-only query may say, decided from its tokens before it is sent.

The server is what refuses a write (a read-only user on the embedded server, READ
transactions on Neo4j). This check comes first and refuses by default: a query that is not
plainly a read is never sent. It reads the query the way the servers' lexers do, and where
two lexers might read a character differently it refuses rather than guesses (the tests
compare its tokens with those of ArcadeDB's own Cypher 25 lexer).

**Tokens.** Strings in ``'...'`` or ``"..."`` with backslash escapes (``\\'`` does not end a
string); names in backticks with ``````` for a backtick (a quote inside one is a letter);
``//`` comments to the end of the line and ``/* */`` comments (not nested, as in the
servers' grammars); ``$`` parameters; ASCII words, numbers and symbols. Refused: an
unterminated string, name or comment (a lexer that gives up on one reads the rest as code),
a backslash outside a string or inside a name, a ``\\u`` escape in a string that spells a
quote, backtick or backslash (either would matter to a lexer that decodes escapes first), a
non-ASCII character outside strings, names and comments (unicode spaces, look-alike
letters), and a number run into a name or with a leading zero (``12abc``, ``01``). A ``//``
comment ends at the first line break any lexer knows (``\\r``, U+2028, ...): ending it early
only leaves more text to check.

**Words.** A word after ``:`` or ``::`` is a label or a type; after a ``.`` that follows a
name, a parameter or a closing bracket (not a number: ``1.`` is a number to some lexers) a
property key or a namespace's part; before the ``:`` of a map entry, or after the ``.`` of a
map projection, a key. None of these is a clause (``n.create``, ``{set: 1}``, ``n {.set}``
pass, as do ``'DELETE'`` and ```DELETE```, which are no words at all). Every other word:

1. a statement (the query, each side of a UNION, a ``CALL { }`` or ``EXISTS { }`` body)
   begins with MATCH, OPTIONAL, UNWIND, WITH, RETURN or CALL (``EXISTS``, ``COUNT`` and
   ``COLLECT`` bodies also with a pattern); not with EXPLAIN or PROFILE, whose query type
   ArcadeDB reports as a write, nor with a ``CYPHER`` option;
2. a word right after an expression is a read clause or an operator (`CONTINUATIONS`):
   anything else there, a writing clause or a word no grammar has, is refused;
3. the writing and administrative keywords (`REFUSED`: CREATE, MERGE, SET, DELETE, LOAD CSV,
   SHOW, TERMINATE, USE, IN TRANSACTIONS, ...) are refused wherever they stand;
4. ``CALL`` opens a subquery or calls a procedure of `PROCEDURES`, by its full name;
5. a function of a namespace that runs query text or reaches files (`DENIED_FUNCTIONS`) is
   refused; other functions cannot write (Cypher functions are read-only, and the server
   holds the transaction to that).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import PipelineError

WORD, NAME, STRING, NUMBER, PARAM, SYMBOL = "word", "name", "string", "number", "param", "symbol"

STARTERS = frozenset({"MATCH", "OPTIONAL", "UNWIND", "WITH", "RETURN", "CALL"})

# Words that may follow an expression: the read clauses and the operators.
CONTINUATIONS = frozenset({
    "MATCH", "OPTIONAL", "WHERE", "WITH", "RETURN", "UNWIND", "CALL", "YIELD", "ORDER", "SKIP",
    "LIMIT", "OFFSET", "UNION", "USING", "FILTER", "LET", "NEXT", "FINISH",
    "AND", "OR", "XOR", "NOT", "IS", "IN", "AS", "STARTS", "ENDS", "CONTAINS",
    "ASC", "ASCENDING", "DESC", "DESCENDING", "WHEN", "THEN", "ELSE", "END",
    "PATH", "PATHS", "GROUP", "GROUPS",
})

# Writing clauses, administration and transaction control: refused wherever they stand.
# (START, STOP and the like begin administration commands only, which rule 1 refuses, and
# stay usable as names: `MATCH (start)-->(end)`.)
REFUSED = frozenset({
    "CREATE", "MERGE", "SET", "DELETE", "DETACH", "NODETACH", "REMOVE", "FOREACH", "INSERT",
    "LOAD", "DROP", "ALTER", "RENAME", "GRANT", "DENY", "REVOKE", "SHOW", "TERMINATE", "USE",
    "TRANSACTIONS", "TRANSACTION", "CONCURRENT", "COMMIT", "ROLLBACK", "PERIODIC", "DEFINE",
})

# Keywords read queries use that take an operand: the word after one is not checked by
# rule 2. Every other word is a name (a variable, a function), so an expression ends there.
OPERAND_KEYWORDS = CONTINUATIONS - {"END"} | REFUSED | {
    "BY", "ALL", "DISTINCT", "EXISTS", "COUNT", "COLLECT", "CASE", "ANY", "NONE", "SINGLE",
    "REDUCE", "SHORTEST", "INDEX", "SCAN", "JOIN", "ON", "WALK", "TRAIL", "ACYCLIC",
    "REPEATABLE", "DIFFERENT", "ELEMENTS", "RELATIONSHIPS", "TYPED", "NORMALIZED", "NFC",
    "NFD", "NFKC", "NFKD",
}

# The procedures a read-only query may call (compared without case).
PROCEDURES = (
    "db.labels", "db.relationshipTypes", "db.propertyKeys", "db.schema.visualization",
    "db.schema.nodeTypeProperties", "db.schema.relTypeProperties",
    "db.index.fulltext.queryNodes", "db.index.fulltext.queryRelationships",
    "db.index.vector.queryNodes", "db.index.vector.queryRelationships",
)
_PROCEDURES = frozenset(p.lower() for p in PROCEDURES)

# Function namespaces that run Cypher held in a string, or reach files, URLs or the system;
# and ArcadeDB's util.sleep, which holds a server thread for as long as it is asked to.
DENIED_FUNCTIONS = ("apoc.cypher", "apoc.load", "apoc.import", "apoc.export",
                    "apoc.periodic", "apoc.trigger", "apoc.systemdb", "apoc.do",
                    "apoc.custom", "apoc.static", "apoc.log", "apoc.util", "dbms", "util.sleep")

_WHITESPACE = frozenset(" \t\n\r\f\v\x1c\x1d\x1e\x1f")
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_SYMBOLS = ("..", "::", "<>", "<=", ">=", "=~", "+=", *"()[]{},.:;|&!=<>+-*/%^")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Decimal digits group with single underscores between them (1_000); no leading zero (01
# and 0_1 lex as names on ArcadeDB): anything run into a number is refused after it.
_DIGIT_RUN = r"[0-9](?:_?[0-9])*"
_NUMBER = re.compile(rf"0[xX][0-9A-Fa-f]+|0[oO][0-7]+"
                     rf"|(?:(?:0|[1-9](?:_?[0-9])*)(?:\.{_DIGIT_RUN})?|\.{_DIGIT_RUN})"
                     rf"(?:[eE][+-]?{_DIGIT_RUN})?")
_DIGITS = re.compile(r"[0-9]+")
# Java reads \uu0027 as \u0027 too (JLS 3.3): any number of u's.
_HEX_ESCAPE = re.compile(r"\\(?:u+([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8}))")


class ReadOnlyQueryError(PipelineError):
    """A query sent as read-only was refused: names what in it was refused."""

    def __init__(self, clause: str) -> None:
        self.clause = clause
        super().__init__(f"read-only query refused: {clause}; run it with --write "
                         "(write=True from Python) to let it change the graph")


@dataclass(frozen=True)
class Token:
    kind: str  # WORD, NAME, STRING, NUMBER, PARAM or SYMBOL
    text: str  # as written; a NAME or PARAM: its name, backticks undone
    start: int  # offset in the query

    @property
    def upper(self) -> str:
        """A word in capitals (keywords are case-insensitive); '' for anything else."""
        return self.text.upper() if self.kind == WORD else ""

    def is_symbol(self, *texts: str) -> bool:
        return self.kind == SYMBOL and self.text in texts

    def __str__(self) -> str:
        return {NAME: f"`{self.text}`", PARAM: f"${self.text}",
                STRING: f"'{self.text}'"}.get(self.kind, self.text)


def tokenize(query: str) -> list[Token]:
    """The tokens of ``query``, comments and whitespace dropped; `ReadOnlyQueryError` where
    the text could lex two ways (see the module's docstring)."""
    tokens: list[Token] = []
    i, n = 0, len(query)
    while i < n:
        c = query[i]
        if c in _WHITESPACE:
            i += 1
        elif query.startswith("//", i):
            brk = _LINE_BREAKS.search(query, i)
            i = n if brk is None else brk.start()
        elif query.startswith("/*", i):
            end = query.find("*/", i + 2)
            if end < 0:
                raise ReadOnlyQueryError(f"an unterminated /* comment at offset {i}")
            i = end + 2
        elif c in "'\"":
            i = _string(query, i, tokens)
        elif c == "`":
            name, end = _backticked(query, i)
            tokens.append(Token(NAME, name, i))
            i = end
        elif c == "$":
            i = _parameter(query, i, tokens)
        elif c in "0123456789." and (m := _NUMBER.match(query, i)):
            if m.end() < n and (query[m.end()].isalnum() or query[m.end()] == "_"):
                raise ReadOnlyQueryError(f"a number literal run into a name or digits at "
                                         f"offset {i}")
            tokens.append(Token(NUMBER, m.group(), i))
            i = m.end()
        elif m := _WORD.match(query, i):
            tokens.append(Token(WORD, m.group(), i))
            i = m.end()
        else:
            symbol = next((s for s in _SYMBOLS if query.startswith(s, i)), None)
            if symbol is None:
                raise ReadOnlyQueryError(f"the character {c!r} (U+{ord(c):04X}) at offset {i} "
                                         "outside a string or a `quoted` name")
            tokens.append(Token(SYMBOL, symbol, i))
            i += len(symbol)
    return tokens


def _string(query: str, i: int, tokens: list[Token]) -> int:
    quote, j, n = query[i], i + 1, len(query)
    while j < n and query[j] != quote:
        j += 2 if query[j] == "\\" else 1
    if j >= n:
        raise ReadOnlyQueryError(f"an unterminated string literal at offset {i}")
    body = query[i + 1:j]
    for m in _HEX_ESCAPE.finditer(body):
        if chr(int(m.group(1) or m.group(2), 16)) in "'\"`\\":
            raise ReadOnlyQueryError(f"the escape {m.group()} in a string at offset {i} "
                                     "(a quote or backslash: write it plainly)")
    tokens.append(Token(STRING, body, i))
    return j + 1


def _backticked(query: str, i: int) -> tuple[str, int]:
    """A ```name``` at ``i``: its name (```` `` ```` undone) and the offset after it."""
    j = i + 1
    while True:
        j = query.find("`", j)
        if j < 0:
            raise ReadOnlyQueryError(f"an unterminated `quoted` name at offset {i}")
        if query.startswith("``", j):
            j += 2
            continue
        name = query[i + 1:j].replace("``", "`")
        if "\\" in name:
            raise ReadOnlyQueryError(f"a backslash in the `quoted` name at offset {i}")
        return name, j + 1


def _parameter(query: str, i: int, tokens: list[Token]) -> int:
    if query.startswith("`", i + 1):
        name, end = _backticked(query, i + 1)
    elif m := (_WORD.match(query, i + 1) or _DIGITS.match(query, i + 1)):
        name, end = m.group(), m.end()
    else:
        raise ReadOnlyQueryError(f"a $ without a parameter name at offset {i}")
    tokens.append(Token(PARAM, name, i))
    return end


def check_read_only(query: str) -> None:
    """Return if ``query`` may run as a read; `ReadOnlyQueryError` naming what is refused."""
    _Walk(tokenize(query)).run()


class _Walk:
    """One pass over a statement's tokens, tracking brackets and where statements start."""

    def __init__(self, tokens: list[Token]) -> None:
        self.t = tokens
        self.stack: list[str] = []  # "(", "[", "map" or "sub" for each open bracket
        self.subqueries: dict[int, bool] = {}  # "{" index -> whether a pattern may begin it
        self.skip: set[int] = set()  # words read already (procedure names, UNION ALL)
        self.start: bool | None = False  # at a statement's start (None: a pattern may begin)

    def run(self) -> None:
        if not self.t:
            raise ReadOnlyQueryError("an empty query")
        self.start = True
        for i, tok in enumerate(self.t):
            if i in self.skip:
                continue
            if tok.kind == SYMBOL:
                self._symbol(i, tok)
            elif tok.kind == WORD:
                self._word(i, tok)
            elif self.start is not False:
                raise ReadOnlyQueryError(f"{tok} cannot begin a read-only statement "
                                         f"({_STARTERS_TEXT} can)")
            elif tok.kind == NAME and not self._key_or_label(i):
                self._function(i)  # `apoc.cypher.run`(...) names a function too

    def _symbol(self, i: int, tok: Token) -> None:
        text = tok.text
        if self.start is not False and not (self.start is None and text == "("):
            raise ReadOnlyQueryError(f"{text!r} cannot begin a read-only statement "
                                     f"({_STARTERS_TEXT} can)")
        self.start = False
        if text in ("(", "["):
            self.stack.append(text)
        elif text == "{":
            if i in self.subqueries:
                self.stack.append("sub")
                self.start = None if self.subqueries[i] else True
            else:
                self.stack.append("map")
        elif text in (")", "]", "}"):
            opener = {")": ("(",), "]": ("[",), "}": ("map", "sub")}[text]
            if not self.stack or self.stack.pop() not in opener:
                raise ReadOnlyQueryError(f"an unbalanced {text!r} at offset {tok.start}")
        elif text == ";" and i != len(self.t) - 1:
            raise ReadOnlyQueryError("more than one statement (a ';' with more after it)")

    def _word(self, i: int, tok: Token) -> None:
        prev = self.t[i - 1] if i else None
        nxt = self.t[i + 1] if i + 1 < len(self.t) else None
        if self._key_or_label(i):
            return
        if (nxt is not None and nxt.is_symbol(":") and prev is not None
                and prev.is_symbol("{", ",") and self.stack and self.stack[-1] == "map"):
            return  # a map's key
        word = tok.upper
        if self.start is not False:
            if word not in STARTERS:
                raise ReadOnlyQueryError(_refused(self.t, i) if word in REFUSED else
                                         f"{tok} cannot begin a read-only statement "
                                         f"({_STARTERS_TEXT} can)")
            self.start = False
        elif word in REFUSED:
            raise ReadOnlyQueryError(_refused(self.t, i))
        elif self._ends_expression(i - 1) and word not in CONTINUATIONS:
            raise ReadOnlyQueryError(f"{tok} where a read clause or an operator should be")
        if word == "CALL":
            self._call(i)
        elif word in ("EXISTS", "COUNT", "COLLECT") and nxt is not None and nxt.is_symbol("{"):
            self.subqueries[i + 1] = True
        elif word == "UNION" or (word == "NEXT" and self._ends_expression(i - 1)):
            if nxt is not None and nxt.upper in ("ALL", "DISTINCT"):
                self.skip.add(i + 1)
            self.start = True
        else:
            self._function(i)

    def _key_or_label(self, i: int) -> bool:
        """Whether the token at ``i`` is a property key or a namespace's part (after a
        ``.`` that follows what has properties, not a number, which a lexer might read as
        ``1.``; or a ``.key`` of a map projection), a label or a type (after ``:``, ``::``)."""
        if i < 1:
            return False
        prev = self.t[i - 1]
        if prev.is_symbol(":", "::"):
            return True
        if not prev.is_symbol(".") or i < 2:
            return False
        before = self.t[i - 2]
        return (before.kind in (WORD, NAME, PARAM) or before.is_symbol(")", "]", "}")
                or (before.is_symbol("{", ",") and self.stack[-1:] == ["map"]))

    def _ends_expression(self, i: int) -> bool:
        if i < 0:
            return False
        tok = self.t[i]
        if tok.kind == SYMBOL:
            return tok.text in (")", "]", "}")
        if tok.kind != WORD or self._key_or_label(i):
            return True  # a literal, a parameter, a name; a property key or a label
        return tok.upper not in OPERAND_KEYWORDS

    def _dotted(self, i: int) -> tuple[str, int]:
        """The name ``a.b.c`` of words and `names` from ``i``, and the index after it."""
        parts = [self.t[i].text]
        j = i + 1
        while (j + 1 < len(self.t) and self.t[j].is_symbol(".")
               and self.t[j + 1].kind in (WORD, NAME)):
            parts.append(self.t[j + 1].text)
            j += 2
        return ".".join(parts), j

    def _call(self, i: int) -> None:
        nxt = self.t[i + 1] if i + 1 < len(self.t) else None
        if nxt is None:
            raise ReadOnlyQueryError("CALL with nothing to call")
        if nxt.is_symbol("{"):
            self.subqueries[i + 1] = False
        elif nxt.is_symbol("("):  # CALL (a, b) { ... }: a subquery with its variables
            close = next((j for j in range(i + 2, len(self.t)) if self.t[j].is_symbol(")")),
                         None)
            if (close is None or close + 1 >= len(self.t) or not self.t[close + 1].is_symbol("{")
                    or any(t.kind != WORD and not t.is_symbol(",", "*")
                           for t in self.t[i + 2:close])):
                raise ReadOnlyQueryError("CALL ( ... ) without a subquery after it")
            self.subqueries[close + 1] = False
        elif nxt.kind in (WORD, NAME):
            name, end = self._dotted(i + 1)
            if name.lower() not in _PROCEDURES:
                raise ReadOnlyQueryError(f"the procedure {name} is not on the read-only list "
                                         "(db.labels, db.relationshipTypes, db.propertyKeys, "
                                         "db.schema.*, db.index.*.query*)")
            self.skip.update(range(i + 1, end))
        else:
            raise ReadOnlyQueryError(f"CALL {nxt}")

    def _function(self, i: int) -> None:
        """A call at ``i`` of a function of `DENIED_FUNCTIONS` is refused."""
        name, end = self._dotted(i)
        if end < len(self.t) and self.t[end].is_symbol("("):
            lower = name.lower()
            for denied in DENIED_FUNCTIONS:
                if lower == denied or lower.startswith(denied + "."):
                    raise ReadOnlyQueryError(f"the function {name} is not one a read-only "
                                             f"query may call ({denied} is refused)")


_STARTERS_TEXT = "MATCH, OPTIONAL MATCH, UNWIND, WITH, RETURN or CALL"
_OBJECTS = frozenset({
    "INDEX", "INDEXES", "CONSTRAINT", "CONSTRAINTS", "DATABASE", "DATABASES", "USER",
    "USERS", "ROLE", "ROLES", "TRANSACTION", "TRANSACTIONS", "PROCEDURES", "FUNCTIONS",
    "SETTINGS", "SERVERS", "PRIVILEGES", "ALIAS", "ALIASES", "FULLTEXT", "VECTOR", "RANGE",
    "TEXT", "POINT", "LOOKUP", "COMPOSITE", "CURRENT", "QUERIES", "CSV",
})


def _refused(tokens: list[Token], i: int) -> str:
    """The refused keyword at ``i`` as a person would name it."""
    word = tokens[i].upper
    nxt = tokens[i + 1].upper if i + 1 < len(tokens) else ""
    if word in ("DETACH", "NODETACH"):
        name = f"{word} DELETE"
    elif word in ("TRANSACTIONS", "CONCURRENT"):
        name = "CALL { ... } IN TRANSACTIONS"
    elif word == "LOAD":
        name = "LOAD CSV"
    elif nxt in _OBJECTS:
        name = f"{word} {nxt}"
    else:
        name = word
    return f"{name} is not a read clause"
