"""Read-only queries, attacked: the check before sending, the server's own refusal, the
reported query type.

`PROBES` is an adversarial corpus of queries sent as read-only (quote smuggling in
backtick names, clauses hidden by comments, escapes and unicode, CALL ... IN TRANSACTIONS,
LOAD CSV, SHOW/TERMINATE, USE, procedures, schema and user commands, writes in subqueries,
any case); each must be refused, through `GraphStore.run_cypher` and through
``moe-pipeline query``, with nothing changed (seen by a driver of its own, as the server's
administrator) and nothing leaked (no line of /etc/passwd, no password). `READS` are
legitimate questions, keywords in their strings, names and keys included, that must still
answer. The embedded server is also asked directly, as the reader user and with no check in
front, to show that it refuses every write by itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from neo4j import GraphDatabase
from neo4j.exceptions import Neo4jError

from pipeline.storage import cypher_guard
from pipeline.storage.cypher import Dialect
from pipeline.storage.cypher_guard import ReadOnlyQueryError, Token, check_read_only, tokenize
from pipeline.storage.graph import QueryError

ROOT = Path(__file__).resolve().parents[1]

# (query, what the refusal names). Every one is sent as read-only and must be refused.
PROBES: list[tuple[str, str]] = [
    # -- quotes smuggled in backtick names, and strings that hide nothing -------------------
    ("UNWIND [1] AS `'` CALL { MATCH (s:Source) WITH s LIMIT 5 DETACH DELETE s } "
     "IN TRANSACTIONS RETURN 1 AS x //'", "DETACH DELETE"),
    ("UNWIND [1] AS `'` MATCH (i:Insight) SET i.hacked = true RETURN count(i) AS n //'", "SET"),
    ("UNWIND [1] AS `'` MATCH (s:Source) SET s:Hacked RETURN count(s) AS n //'", "SET"),
    ("UNWIND [1] AS `'` CREATE INDEX hacked FOR (n:Source) ON (n.text) //'", "CREATE INDEX"),
    ('UNWIND [1] AS `"` MATCH (s:Source) DETACH DELETE s //"', "DETACH DELETE"),
    ("RETURN `a'b` AS x, 1 AS y CREATE (:Hacked)", "CREATE"),
    ("MATCH (n) WHERE n.id = '`' CREATE (:Hacked) RETURN '`'", "CREATE"),
    ("RETURN '\\'' AS q CREATE (:Hacked) //'", "CREATE"),
    ('RETURN "\\"" AS q MERGE (:Hacked) //"', "MERGE"),
    ("RETURN `x``'` AS y MERGE (:Hacked {id: 1}) //'", "MERGE"),
    ("RETURN 'abc\\' CREATE (:Hacked) //", "unterminated string"),
    ("RETURN `abc CREATE (:Hacked)", "unterminated `quoted` name"),
    ("RETURN 'a''b' AS x CREATE (:Hacked)", "CREATE"),
    ("RETURN `a\\` CREATE (:Hacked) //`", "backslash in the `quoted` name"),
    ("UNWIND [1] AS `'` LOAD CSV FROM 'file:///etc/passwd' AS l RETURN l //'", "LOAD CSV"),
    # -- comments that would hide a clause -------------------------------------------------
    ("RETURN 1 AS x // hide\rCREATE (:Hacked)", "CREATE"),
    ("RETURN 1 AS x // hide\u2028CREATE (:Hacked)", "U+2028"),
    ("RETURN 1 AS x // hide\x85CREATE (:Hacked)", "U+0085"),
    ("RETURN 1 AS x // hide\x0bCREATE (:Hacked)", "CREATE"),
    ("RETURN 1 AS x //\nCREATE (:Hacked)", "CREATE"),
    ("RETURN 1 AS x /* open CREATE (:Hacked)", "unterminated /* comment"),
    ("RETURN 1 AS x /* a /* b */ CREATE (:Hacked) */", "CREATE"),
    ("RETURN 1 AS x /* ' */ CREATE (:Hacked) /* ' */", "CREATE"),
    ("MATCH (n) /* `*/ SET n.hacked = 1 //` */ RETURN n", "SET"),
    ("RETURN '/*' AS a CREATE (:Hacked) RETURN '*/'", "CREATE"),
    ("RETURN '//' AS a MERGE (:Hacked)", "MERGE"),
    # -- escapes and characters a lexer might read otherwise -------------------------------
    ("RETURN '\\u0027' AS q CREATE (:Hacked) //'", "escape \\u0027"),
    ("RETURN '\\u005c' AS q CREATE (:Hacked) //'", "escape \\u005c"),
    ("RETURN '\\U00000027' AS q CREATE (:Hacked) //'", "escape \\U00000027"),
    ("RETURN '\\uu0027' AS q CREATE (:Hacked) //'", "escape \\uu0027"),
    ("RETURN \"\\u0022\" AS q CREATE (:Hacked) //\"", "escape \\u0022"),
    ("RETURN `\\u0060` AS q CREATE (:Hacked) //`", "backslash in the `quoted` name"),
    ("MATCH (n) \\u0053ET n.hacked = 1 RETURN n", "'\\\\'"),
    ("RETURN 1 AS x\u00a0CREATE (:Hacked)", "U+00A0"),
    ("RETURN 1 AS x\u3000CREATE (:Hacked)", "U+3000"),
    ("MATCH (n) \uff33\uff25\uff34 n.hacked = 1 RETURN n", "U+FF33"),
    ("MATCH (n) SET\u200b n.hacked = 1", "U+200B"),
    ("MATCH (n) D\u0395TACH DELETE n", "U+0395"),
    ("RETURN 1 AS x \x00 CREATE (:Hacked)", "U+0000"),
    ("RETURN 12CREATE", "number literal run into a name"),
    ("RETURN 0_1 AS x, 01 AS y CREATE (:Hacked)", "number literal run into"),
    ("WITH 1 AS x # CREATE (:Hacked)", "'#'"),
    ("RETURN $ x", "a $ without a parameter name"),
    # -- CALL ... IN TRANSACTIONS commits whatever the outer transaction does ---------------
    ("UNWIND [1] AS x CALL { CREATE (:Hacked) } IN TRANSACTIONS", "CREATE"),
    ("CALL { MATCH (s:Source) WITH s LIMIT 1 DETACH DELETE s } IN TRANSACTIONS OF 1 ROW",
     "DETACH DELETE"),
    ("MATCH (s:Source) CALL (s) { RETURN s.id AS i } IN TRANSACTIONS RETURN i",
     "IN TRANSACTIONS"),
    ("UNWIND [1] AS x CALL { RETURN 1 AS y } IN CONCURRENT TRANSACTIONS RETURN y",
     "IN TRANSACTIONS"),
    ("UNWIND [1] AS x CALL { RETURN 1 AS y } IN /* c */ TRANSACTIONS RETURN y",
     "IN TRANSACTIONS"),
    ("unwind [1] as x call { return 1 as y } in transactions return y", "IN TRANSACTIONS"),
    ("UNWIND [1] AS x CALL { RETURN 1 AS y } IN 2 CONCURRENT TRANSACTIONS OF 10 ROWS "
     "ON ERROR CONTINUE RETURN y", "IN TRANSACTIONS"),
    # -- LOAD CSV: the server's files ------------------------------------------------------
    ("LOAD CSV FROM 'file:///etc/passwd' AS line RETURN line", "LOAD CSV"),
    ("LOAD CSV WITH HEADERS FROM 'file:///etc/passwd' AS line RETURN line", "LOAD CSV"),
    ("load csv from '/etc/passwd' as line return line", "LOAD CSV"),
    ("UNWIND ['file:///etc/passwd'] AS f LOAD CSV FROM f AS line RETURN line", "LOAD CSV"),
    ("CALL { LOAD CSV FROM 'file:///etc/passwd' AS l RETURN l } RETURN l", "LOAD CSV"),
    ("LOAD CSV FROM 'http://127.0.0.1:1/x.csv' AS l RETURN l", "LOAD CSV"),
    ("MATCH (n) WITH n LIMIT 1 LOAD CSV FROM 'file:///{password}' AS l RETURN l", "LOAD CSV"),
    # -- other clients' transactions -------------------------------------------------------
    ("SHOW TRANSACTIONS", "SHOW TRANSACTIONS"),
    ("SHOW TRANSACTIONS YIELD currentQuery RETURN currentQuery", "SHOW TRANSACTIONS"),
    ("show transactions", "SHOW TRANSACTIONS"),
    ("TERMINATE TRANSACTIONS 'q1-x'", "TERMINATE TRANSACTIONS"),
    ("SHOW TRANSACTIONS YIELD transactionId TERMINATE TRANSACTIONS transactionId",
     "SHOW TRANSACTIONS"),
    ("SHOW INDEXES", "SHOW INDEXES"),
    ("SHOW USERS", "SHOW USERS"),
    ("SHOW PROCEDURES", "SHOW PROCEDURES"),
    ("SHOW DATABASES", "SHOW DATABASES"),
    ("CALL { SHOW TRANSACTIONS } RETURN 1", "SHOW TRANSACTIONS"),
    ("MATCH (n) RETURN n.id AS id UNION SHOW TRANSACTIONS", "SHOW TRANSACTIONS"),
    # -- another database ------------------------------------------------------------------
    ("USE system SHOW USERS", "USE"),
    ("USE insights MATCH (n) RETURN n", "USE"),
    ("CALL { USE system MATCH (n) RETURN n } RETURN n", "USE"),
    # -- procedures and functions ----------------------------------------------------------
    ("CALL apoc.merge.node(['Hacked'], {id: 1})", "procedure apoc.merge.node"),
    ("CALL apoc.create.node(['Hacked'], {})", "procedure apoc.create.node"),
    ("CALL apoc.cypher.runWrite('CREATE (:Hacked)', {})", "procedure apoc.cypher.runWrite"),
    ("CALL apoc.periodic.iterate('MATCH (n) RETURN n', 'SET n.hacked = 1', {})",
     "procedure apoc.periodic.iterate"),
    ("CALL apoc.load.json('file:///etc/passwd')", "procedure apoc.load.json"),
    ("CALL dbms.listQueries()", "procedure dbms.listQueries"),
    ("CALL dbms.killQuery('q1')", "procedure dbms.killQuery"),
    ("CALL dbms.security.createUser('x', 'y', false)", "procedure dbms.security.createUser"),
    ("CALL db.createLabel('Hacked')", "procedure db.createLabel"),
    ("CALL db.migrateLegacyTemporals()", "procedure db.migrateLegacyTemporals"),
    ("CALL `apoc`.`merge`.`node`(['Hacked'], {})", "procedure apoc.merge.node"),
    ("CALL `apoc.merge.node`(['Hacked'], {})", "procedure apoc.merge.node"),
    ("CALL apoc . merge . node(['Hacked'], {})", "procedure apoc.merge.node"),
    ("CALL merge.node(['Source'], {id: 'hacked'})", "procedure merge.node"),
    ("CALL refactor.mergeNodes([], {})", "procedure refactor.mergeNodes"),
    ("CALL algo.pagerank()", "procedure algo.pagerank"),
    ("CALL gds.pageRank.write('g', {})", "procedure gds.pageRank.write"),
    ("CALL db.labels() YIELD label CALL apoc.create.addLabels([], [label]) YIELD node "
     "RETURN node", "procedure apoc.create.addLabels"),
    ("call DB.LABELS() yield label merge (:Hacked {l: label})", "MERGE"),
    ("CALL unknown.proc()", "procedure unknown.proc"),
    ("RETURN apoc.cypher.runFirstColumnSingle('MATCH (n) DETACH DELETE n', {}) AS x",
     "function apoc.cypher.runFirstColumnSingle"),
    ("RETURN apoc.util.sleep(100000) AS x", "function apoc.util.sleep"),
    ("RETURN dbms.components() AS x", "function dbms.components"),
    ("RETURN util.sleep(100000) AS x", "function util.sleep"),
    ("RETURN `apoc.cypher.runFirstColumnSingle`('CREATE (n) RETURN n', {}) AS x",
     "function apoc.cypher.runFirstColumnSingle"),
    ("RETURN `apoc`.cypher.runFirstColumnMany('CREATE (n) RETURN n', {}) AS x",
     "function apoc.cypher.runFirstColumnMany"),
    ("RETURN 1. CREATE (:Hacked)", "CREATE"),
    ("RETURN 1 AS x, 2.5. MERGE (:Hacked)", "MERGE"),
    # -- schema, users, databases ----------------------------------------------------------
    ("CREATE INDEX hacked FOR (n:Source) ON (n.text)", "CREATE INDEX"),
    ("CREATE CONSTRAINT hacked FOR (n:Source) REQUIRE n.text IS UNIQUE", "CREATE CONSTRAINT"),
    ("DROP CONSTRAINT source_id", "DROP CONSTRAINT"),
    ("DROP INDEX insight_shard_seq", "DROP INDEX"),
    ("ALTER DATABASE insights SET ACCESS READ ONLY", "ALTER DATABASE"),
    ("CREATE USER hacker SET PASSWORD 'x'", "CREATE USER"),
    ("GRANT ROLE admin TO reader", "GRANT ROLE"),
    ("DENY READ {*} ON GRAPH * TO PUBLIC", "DENY"),
    ("REVOKE ROLE admin FROM root", "REVOKE ROLE"),
    ("RENAME USER root TO hacked", "RENAME USER"),
    ("START DATABASE insights", "START cannot begin"),
    ("STOP DATABASE insights", "STOP cannot begin"),
    ("CREATE DATABASE hacked", "CREATE DATABASE"),
    ("DEFINE FUNCTION hack() RETURN 1", "DEFINE"),
    # -- writes inside subqueries, in any case ---------------------------------------------
    ("MATCH (s:Source) CALL { WITH s SET s.hacked = true } RETURN count(s)", "SET"),
    ("MATCH (s:Source) WHERE EXISTS { MATCH (s) SET s.hacked = 1 } RETURN s", "SET"),
    ("MATCH (s:Source) RETURN COUNT { MATCH (s) DETACH DELETE s } AS c", "DETACH DELETE"),
    ("MATCH (s:Source) RETURN COLLECT { CREATE (h:Hacked) RETURN h } AS c", "CREATE"),
    ("MATCH (s:Source) FOREACH (x IN [1] | SET s.hacked = x)", "FOREACH"),
    ("MATCH (s:Source) WITH s FOREACH (x IN [1] | CREATE (:Hacked))", "FOREACH"),
    ("match (s:Source) set s.hacked = true", "SET"),
    ("MaTcH (s:Source) ReMoVe s.text", "REMOVE"),
    ("merge (h:Hacked {id: 1}) return h", "MERGE"),
    ("MATCH (s:Source) WITH s LIMIT 1 delete s", "DELETE"),
    ("MATCH (s:Source) WITH s LIMIT 1 DETACH\nDELETE s", "DETACH DELETE"),
    ("MATCH (s:Source) SET s += {hacked: true}", "SET"),
    ("MATCH (s:Source) SET s = {}", "SET"),
    ("MATCH (s:Source) REMOVE s:Source", "REMOVE"),
    ("MATCH (s:Source) WITH s LIMIT 1 NODETACH DELETE s", "NODETACH DELETE"),
    ("INSERT (:Hacked)", "INSERT"),
    ("MATCH (s:Source) MERGE (s)-[:HACKED]->(s)", "MERGE"),
    ("MATCH (s:Source) OPTIONAL MATCH (s)-->(x) CREATE (s)-[:HACKED]->(s)", "CREATE"),
    ("OPTIONAL MATCH (n) CREATE (:Hacked)", "CREATE"),
    ("MATCH (s:Source) RETURN s.id AS id UNION MATCH (s:Source) SET s.hacked = 1 "
     "RETURN s.id AS id", "SET"),
    ("RETURN 1 AS x UNION ALL CREATE (h:Hacked) RETURN 1 AS x", "CREATE"),
    ("MATCH (s:Source) RETURN s; MATCH (s:Source) DETACH DELETE s", "more than one statement"),
    ("MATCH (s:Source) WITH s CALL { WITH s MERGE (:Hacked {id: s.id}) } RETURN 1", "MERGE"),
    ("MATCH (s:Source) SET s.`hacked` = 1", "SET"),
    ("WITH 1 AS x CREATE (:Hacked)", "CREATE"),
    ("UNWIND range(1, 3) AS i CREATE (:Hacked {i: i})", "CREATE"),
    ("MATCH (s:Source) WHERE s.id = 'x' SET s.text = 'SET'", "SET"),
    # -- not plainly a read: refused by default --------------------------------------------
    ("CYPHER runtime=slotted MATCH (n) RETURN n", "CYPHER cannot begin"),
    ("EXPLAIN CREATE (:Hacked)", "EXPLAIN cannot begin"),
    ("PROFILE MATCH (s:Source) SET s.hacked = 1", "PROFILE cannot begin"),
    ("FROBNICATE (n)", "FROBNICATE cannot begin"),
    ("MATCH (n) WITH n FROBNICATE n RETURN n", "FROBNICATE where a read clause"),
    ("COMMIT", "COMMIT"),
    ("ROLLBACK", "ROLLBACK"),
    ("RETURN 1 AS x NEXT CREATE (:Hacked)", "CREATE"),
    ("MATCH (n) RETURN n }", "unbalanced"),
    ("", "an empty query"),
    ("// only a comment", "an empty query"),
    ("`MATCH` (n) RETURN n", "`MATCH` cannot begin"),
]

# Legitimate reads: (query, the rows they must answer, or None for "any"), on `seeded`.
READS: list[tuple[str, list | None]] = [
    ("MATCH (s:Source {guard: $tag}) RETURN count(s) AS n", [{"n": 5}]),
    ("match (s:Source {guard: $tag}) return count(s) as n", [{"n": 5}]),
    ("MATCH (s:Source {guard: $tag}) WHERE s.text CONTAINS 'DETACH DELETE' RETURN count(s) AS n",
     [{"n": 5}]),
    ("MATCH (s:Source {guard: $tag}) WHERE s.n = 1 RETURN s.create AS c, s.set AS s, "
     "s {.create, .set} AS m", [{"c": 1, "s": "v1", "m": {"create": 1, "set": "v1"}}]),
    ("RETURN {set: 1, create: 2, delete: 3} AS m", [{"m": {"set": 1, "create": 2, "delete": 3}}]),
    ("RETURN 'CREATE (n) DETACH DELETE n' AS q, \"SET x\" AS s, 1 AS `DELETE`",
     [{"q": "CREATE (n) DETACH DELETE n", "s": "SET x", "DELETE": 1}]),
    ("RETURN 'it\\'s' AS a, \"say \\\"MERGE\\\"\" AS b, '\\u00e9' AS c",
     [{"a": "it's", "b": 'say "MERGE"', "c": "\u00e9"}]),
    ("RETURN 1 AS `it's`, 2 AS `a``b`, '`' AS tick", [{"it's": 1, "a`b": 2, "tick": "`"}]),
    ("RETURN $create AS c, $set AS s", [{"c": "CREATE", "s": "SET"}]),
    ("CALL db.labels() YIELD label WHERE label = 'Source' RETURN label", [{"label": "Source"}]),
    ("CALL db.labels()", None),
    ("CALL db.relationshipTypes()", None),
    ("CALL db.propertyKeys()", None),
    ("CALL `db`.`labels`() YIELD label WHERE label = 'Insight' RETURN label",
     [{"label": "Insight"}]),
    ("MATCH (s:Source {guard: $tag}) RETURN count(*) AS n, min(s.n) AS lo, max(s.n) AS hi, "
     "sum(s.n) AS total, avg(s.n) AS mean", [{"n": 5, "lo": 1, "hi": 5, "total": 15,
                                              "mean": 3.0}]),
    ("MATCH (s:Source {guard: $tag}) WITH s ORDER BY s.n RETURN collect(s.n) AS ns",
     [{"ns": [1, 2, 3, 4, 5]}]),
    ("MATCH (s:Source {guard: $tag}) OPTIONAL MATCH (s)<-[:SUPPORTED_BY]-(i:Insight) "
     "RETURN s.n AS n, i.summary AS summary ORDER BY n",
     [{"n": k, "summary": f"DELETE me {k}" if k <= 3 else None} for k in range(1, 6)]),
    ("MATCH (s:Source {guard: $tag}) WHERE s.n = 1 RETURN s.n AS n UNION "
     "MATCH (i:Insight {guard: $tag}) WHERE i.seq = 2 RETURN i.seq AS n", None),
    ("MATCH (s:Source {guard: $tag}) RETURN s.n AS n UNION ALL MATCH (s:Source {guard: $tag}) "
     "RETURN s.n AS n", None),
    ("MATCH (i:Insight {guard: $tag}) WHERE EXISTS { (i)-[:SUPPORTED_BY]->(:Source) } "
     "RETURN count(i) AS n", [{"n": 3}]),
    ("MATCH (s:Source {guard: $tag}) WHERE NOT EXISTS { MATCH (s)<-[:SUPPORTED_BY]-(:Insight) }"
     " RETURN count(s) AS n", [{"n": 2}]),
    ("MATCH (i:Insight {guard: $tag}) RETURN i.seq AS seq, COUNT { (i)-[:SUPPORTED_BY]->() } "
     "AS support ORDER BY seq", [{"seq": k, "support": 1} for k in (1, 2, 3)]),
    ("CALL { MATCH (s:Source {guard: $tag}) RETURN s ORDER BY s.n LIMIT 2 } RETURN s.n AS n",
     [{"n": 1}, {"n": 2}]),
    ("MATCH (s:Source {guard: $tag}) RETURN CASE WHEN s.n > 2 THEN 'big' ELSE 'small' END AS "
     "size, count(*) AS n ORDER BY size", [{"size": "big", "n": 3}, {"size": "small", "n": 2}]),
    ("// CREATE nothing\nMATCH (s:Source {guard: $tag}) /* SET s.x = 1 */ RETURN count(s) AS n",
     [{"n": 5}]),
    ("MATCH (start:Source {guard: $tag}) RETURN start.n AS n ORDER BY n DESC SKIP 1 LIMIT 2",
     [{"n": 4}, {"n": 3}]),
    ("WITH 'MERGE' AS word RETURN toLower(word) AS w", [{"w": "merge"}]),
    ("MATCH (s:Source) WHERE s.guard = $tag AND s.text STARTS WITH 'text' "
     "RETURN count(s) AS n", [{"n": 5}]),
    ("UNWIND [1, 2, 3] AS x WITH x WHERE x > 1 RETURN sum(x) AS s", [{"s": 5}]),
    ("RETURN [x IN range(1, 5) WHERE x % 2 = 0 | x * 10] AS evens", [{"evens": [20, 40]}]),
    ("MATCH (n:`Source` {guard: $tag}) RETURN count(n) AS n", [{"n": 5}]),
    ("MATCH (i:Insight {guard: $tag})-[e:SUPPORTED_BY]->(s:Source) RETURN i.seq AS seq, "
     "e.weight AS w ORDER BY seq LIMIT 1", [{"seq": 1, "w": 0.5}]),
    ("MATCH (s:Source {guard: $tag}) WHERE s.n IN [1, 2] AND s.text IS NOT NULL "
     "RETURN count(s) AS n", [{"n": 2}]),
]


# -- the check alone (fast: no server) -------------------------------------------------------

def test_tokens_follow_cyphers_lexical_rules():
    kinds = [(t.kind, t.text) for t in tokenize(
        "MATCH (n:`a``b`) // SET\nWHERE n.x = 'it\\'s \"DELETE\"' /* CREATE */ "
        "AND $p = \"x\\\\\" RETURN n.y AS `'`, 1.5e3, 0x1F")]
    assert kinds == [
        ("word", "MATCH"), ("symbol", "("), ("word", "n"), ("symbol", ":"), ("name", "a`b"),
        ("symbol", ")"), ("word", "WHERE"), ("word", "n"), ("symbol", "."), ("word", "x"),
        ("symbol", "="), ("string", "it\\'s \"DELETE\""), ("word", "AND"), ("param", "p"),
        ("symbol", "="), ("string", "x\\\\"), ("word", "RETURN"), ("word", "n"),
        ("symbol", "."), ("word", "y"), ("word", "AS"), ("name", "'"), ("symbol", ","),
        ("number", "1.5e3"), ("symbol", ","), ("number", "0x1F")]
    assert tokenize("RETURN $`odd name`, $0")[1] == Token("param", "odd name", 7)


@pytest.mark.parametrize("query, named", PROBES, ids=[f"probe{i}" for i in range(len(PROBES))])
def test_every_probe_is_refused_before_it_is_sent(query, named):
    with pytest.raises(ReadOnlyQueryError) as refused:
        check_read_only(query.replace("{password}", "tmp/graph/password"))
    message = str(refused.value)
    assert named in message and "--write" in message and "\n" not in message, message


def test_the_corpus_is_large_and_the_reads_pass_the_check():
    assert len(PROBES) >= 100
    for query, _ in READS:
        check_read_only(query)


def test_every_cypher_block_of_the_readme_passes_the_check():
    blocks = re.findall(r"```cypher\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 10
    for block in blocks:
        check_read_only(block)


@pytest.mark.parametrize("query", [
    "MATCH (n) WHERE n.create = 1 OR n.delete = 2 RETURN n.set, n.`remove`",
    "MATCH (n:Merge)-[:SET]->(m:`CREATE`) RETURN n, m",
    "RETURN {set: 1, `create`: 2, detach: {delete: 3}} AS m",
    "MATCH (n) RETURN n {.create, .set} AS m",
    "RETURN 'DELETE' AS d, \"LOAD CSV\" AS l, 'SHOW TRANSACTIONS' AS s, $use AS u",
    "MATCH (start)-[r]->(end) RETURN start, r, end",
    "RETURN date() AS d, apoc.text.join(['a', 'b'], ',') AS j, toLower('X') AS l",
    "MATCH (n) CALL (n) { MATCH (n)-->(m) RETURN count(m) AS c } RETURN c",
    "MATCH p = shortestPath((a)-[*..3]-(b)) RETURN length(p) AS hops",
    "RETURN reduce(s = 0, x IN [1, 2] | s + x) AS total",
    "MATCH (n) RETURN n;",
])
def test_keywords_as_keys_labels_strings_and_names_are_not_refused(query):
    check_read_only(query)


def test_the_server_dialect_says_whether_explain_can_be_trusted():
    assert not Dialect.for_agent("Neo4j/5.26.0 compatible (ArcadeDB 26.10.2)").explain_query_type
    assert Dialect.for_agent("Neo4j/5.26.1").explain_query_type


# -- through the servers -----------------------------------------------------------------------

def _secrets(graph, server=None) -> list[str]:
    """What no answer may contain: the passwords and every line of /etc/passwd."""
    found = [graph.auth[1]] if graph.auth and graph.auth[1] else []
    if server is not None:
        found += [server.password(), server.reader_password()]
    with contextlib.suppress(OSError):
        found += [line for line in Path("/etc/passwd").read_text().splitlines() if line]
    return found


def _snapshot(driver, database: str | None, tag: str) -> dict:
    """The graph as its administrator sees it, on a session of its own."""
    with driver.session(database=database) as s:
        return {
            "nodes": s.run("MATCH (n) RETURN count(n) AS n").single()["n"],
            "edges": s.run("MATCH ()-[r]->() RETURN count(r) AS n").single()["n"],
            "labels": sorted(r["label"] for r in s.run("CALL db.labels() YIELD label "
                                                       "RETURN label")),
            "hacked": s.run("MATCH (n) WHERE n.hacked IS NOT NULL RETURN count(n) AS n")
                       .single()["n"],
            "seeded": [r.data() for r in s.run(
                "MATCH (n) WHERE n.guard = $tag RETURN n.id AS id, labels(n) AS labels, "
                "properties(n) AS props ORDER BY id", tag=tag)],
            "indexes": sorted(str(r.get("name")) for r in s.run("SHOW INDEXES")),
        }


@pytest.fixture(scope="module")
def seeded(graph):
    """Five sources and three insights under a tag of this module, and an administrator's
    driver of its own to see the graph with."""
    tag = f"guard-{uuid.uuid4().hex[:10]}"
    admin = GraphDatabase.driver(graph.uri, auth=graph.auth)
    with admin.session(database=graph.database) as s:
        s.run("UNWIND range(1, 5) AS k CREATE (s:Source) SET s = {id: $tag + '-s' + toString(k), "
              "guard: $tag, n: k, create: k, set: 'v' + toString(k), "
              "text: 'text ' + toString(k) + ' CREATE (x) DETACH DELETE x'}", tag=tag).consume()
        s.run("MATCH (s:Source) WHERE s.guard = $tag AND s.n <= 3 "
              "CREATE (i:Insight {id: $tag + '-i' + toString(s.n), guard: $tag, seq: s.n, "
              "summary: 'DELETE me ' + toString(s.n)})-[:SUPPORTED_BY {weight: 0.5}]->(s)",
              tag=tag).consume()
    yield tag, admin
    with admin.session(database=graph.database) as s:
        s.run("MATCH (n) WHERE n.guard = $tag DETACH DELETE n", tag=tag).consume()
    admin.close()


@pytest.fixture
def cli(graph, embedded_server, monkeypatch):
    """``moe-pipeline ARGS`` in this process, on the session's graph: the embedded server
    through its state dir, Neo4j through NEO4J_URI as a user sets it: (exit status, stdout,
    stderr)."""
    from pipeline.cli import main

    for name in ("NEO4J_URI", "MOE_NEO4J_URI", "NEO4J_PASSWORD", "NEO4J_USERNAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MOE_STATE_DIR", str(embedded_server.root.parent))
    if graph.dialect.name != "arcadedb":
        monkeypatch.setenv("NEO4J_URI", graph.uri)
        monkeypatch.setenv("NEO4J_USERNAME", graph.auth[0])
        monkeypatch.setenv("NEO4J_PASSWORD", graph.auth[1])

    def run(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as exit_:
                code = int(exit_.code or 0)
        return code, out.getvalue(), err.getvalue()

    return run


def test_probes_are_refused_by_run_cypher_and_change_nothing(graph, seeded, embedded_server):
    tag, admin = seeded
    embedded = graph.dialect.name == "arcadedb"
    password = embedded_server.root / "password"
    before = _snapshot(admin, graph.database, tag)
    secrets = _secrets(graph, embedded_server if embedded else None)
    for query, named in PROBES:
        with pytest.raises(ReadOnlyQueryError) as refused:
            graph.run_cypher(query.replace("{password}", str(password)), {"tag": tag})
        message = str(refused.value)
        assert named in message and "--write" in message, (query, message)
        assert not any(secret in message for secret in secrets), query
        assert _snapshot(admin, graph.database, tag) == before, query


def test_probes_are_refused_by_the_cli_and_change_nothing(cli, graph, seeded, embedded_server):
    tag, admin = seeded
    password = embedded_server.root / "password"
    before = _snapshot(admin, graph.database, tag)
    secrets = _secrets(graph, embedded_server if graph.dialect.name == "arcadedb" else None)
    for query, named in PROBES:
        code, out, err = cli("query", query.replace("{password}", str(password)),
                             "--param", f"tag={tag}")
        assert code == 1 and out == "", (query, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: read-only query refused"), err
        assert named in lines[0] and "--write" in lines[0], (query, err)
        assert not any(secret in out + err for secret in secrets), query
        assert _snapshot(admin, graph.database, tag) == before, query


def test_legitimate_reads_answer_through_run_cypher_and_the_cli(graph, seeded, cli):
    tag, _ = seeded
    params = {"tag": tag, "create": "CREATE", "set": "SET"}
    on_cli = True
    for query, expected in READS:
        rows = graph.run_cypher(query, params)
        if expected is not None:
            assert rows == expected, query
        if on_cli:
            code, out, err = cli("query", query, "--json",
                                 *(f"--param={k}={v}" for k, v in params.items()))
            assert code == 0, (query, err)
            assert [json.loads(line) for line in out.splitlines()] == \
                json.loads(json.dumps(rows, default=str)), query


def test_write_keeps_working_as_the_administrator(graph, seeded, cli):
    tag, admin = seeded
    probe = f"{tag}-written"
    graph.run_cypher("CREATE (:Source {id: $id, guard: $tag})", {"id": probe, "tag": tag},
                     write=True)
    count = "MATCH (s:Source {id: $id}) RETURN count(s) AS n"
    assert graph.run_cypher(count, {"id": probe}) == [{"n": 1}]
    code, out, err = cli("query", "--write", "MATCH (s:Source {id: $id}) SET s.n = 7 "
                         "RETURN s.n AS n", "--param", f"id={probe}", "--json")
    assert (code, out.strip()) == (0, '{"n": 7}'), err
    graph.run_cypher("MATCH (s:Source {id: $id}) DETACH DELETE s", {"id": probe}, write=True)
    assert graph.run_cypher(count, {"id": probe}) == [{"n": 0}]


# The embedded server on its own: writes sent as the reader, with no check in front.
SERVER_REFUSES = [
    "CREATE (:GuardHacked {id: $tag})",
    "CREATE (:Source {id: $tag + '-created'})",
    "MATCH (s:Source) WHERE s.guard = $tag SET s.hacked = true",
    "MATCH (s:Source) WHERE s.guard = $tag SET s:GuardHacked",
    "MATCH (s:Source) WHERE s.guard = $tag SET s += {hacked: 1}",
    "MATCH (s:Source) WHERE s.guard = $tag REMOVE s.text",
    "MATCH (s:Source) WHERE s.guard = $tag DETACH DELETE s",
    "MATCH (i:Insight)-[e:SUPPORTED_BY]->() WHERE i.guard = $tag DELETE e",
    "MERGE (:Source {id: $tag + '-merged'})",
    "MATCH (s:Source) WHERE s.guard = $tag FOREACH (x IN [1] | SET s.hacked = x)",
    "CREATE INDEX guard_hacked IF NOT EXISTS FOR (n:Source) ON (n.text)",
    "DROP INDEX insight_shard_seq",
    "DROP CONSTRAINT source_id",
    "UNWIND [1] AS x CALL { MATCH (s:Source) WHERE s.guard = $tag DETACH DELETE s } "
    "IN TRANSACTIONS",
    "UNWIND [1] AS x CALL { CREATE (:Source {id: $tag + '-tx'}) } IN TRANSACTIONS",
    "CALL merge.node(['Source'], {id: $tag + '-proc'})",
    "LOAD CSV FROM 'file:///etc/passwd' AS line RETURN line",
    "CREATE USER guard_hacker SET PASSWORD 'guard-hacker-pw'",
    "SHOW USERS",
]


def test_the_embedded_server_itself_refuses_writes_from_the_reader(graph, seeded,
                                                                   embedded_server):
    if graph.dialect.name != "arcadedb":
        pytest.skip("the reader user is the embedded server's")
    tag, admin = seeded
    before = _snapshot(admin, graph.database, tag)
    secrets = _secrets(graph, embedded_server)
    reader = GraphDatabase.driver(graph.uri, auth=("reader", embedded_server.reader_password()))
    try:
        with reader.session(database=graph.database) as s:
            assert s.run("MATCH (s:Source) WHERE s.guard = $tag RETURN count(s) AS n",
                         tag=tag).single()["n"] == 5
            # Why no EXPLAIN first here: ArcadeDB reports every EXPLAIN as a write.
            assert s.run("EXPLAIN MATCH (n) RETURN n").consume().query_type == "w"
        for query in SERVER_REFUSES:  # auto-commit: no rollback to save the day
            with reader.session(database=graph.database) as s, \
                    pytest.raises(Neo4jError) as refused:
                s.run(query, tag=tag).consume()
            assert not any(secret in str(refused.value) for secret in secrets), query
            assert _snapshot(admin, graph.database, tag) == before, query
    finally:
        reader.close()


def test_neo4j_itself_refuses_every_write_in_a_read_transaction(graph, seeded):
    """Neo4j Community has one role for every user, so what keeps a read-only query from
    writing on the server's side is READ access mode alone. Sent in READ mode with no check
    in front, every probe and every write above is refused or changes nothing: those that run
    are reads to Neo4j (a comment the guard cannot read unambiguously, a SHOW), and LOAD CSV
    reads no file and no address because the server is configured as docker-compose.yml
    configures it."""
    from neo4j import READ_ACCESS

    if graph.dialect.name == "arcadedb":
        pytest.skip("READ access mode is Neo4j's; the embedded server's reader is tested above")
    tag, admin = seeded
    before = _snapshot(admin, graph.database, tag)
    secrets = _secrets(graph)
    ran, refused = [], 0
    for query in SERVER_REFUSES + [q for q, _ in PROBES if q.strip()]:
        query = query.replace("{password}", "etc/passwd")
        try:
            with admin.session(database=graph.database, default_access_mode=READ_ACCESS) as s:
                result = s.run(query, tag=tag)
                rows = result.data()
                summary = result.consume()
        except Neo4jError as err:
            refused += 1
            assert not any(secret in str(err) for secret in secrets), query
        else:
            assert not summary.counters.contains_updates, query
            assert not summary.counters.contains_system_updates, query
            assert "LOAD CSV" not in query.upper(), (query, rows[:2])
            assert not any(secret in str(rows) for secret in secrets), query
            ran.append(query)
        assert _snapshot(admin, graph.database, tag) == before, query
    # Every write is among the refused; what ran is reads to Neo4j, and only those.
    for query in ran:
        assert not re.search(r"\b(CREATE|MERGE|SET|DELETE|REMOVE|DROP)\b", query) or \
            re.search(r"//|EXPLAIN|\\u005c", query), query
    assert refused > 100, refused


def test_the_reader_sees_and_ends_only_its_own_transactions(graph, embedded_server):
    if graph.dialect.name != "arcadedb":
        pytest.skip("the reader user is the embedded server's")
    admin = GraphDatabase.driver(graph.uri, auth=graph.auth)
    reader = GraphDatabase.driver(graph.uri, auth=("reader", embedded_server.reader_password()))
    marker = f"guard-secret-{uuid.uuid4().hex[:8]}"
    done: dict = {}

    def slow() -> None:
        with admin.session(database=graph.database) as s:
            done["rows"] = s.run("UNWIND range(1, 4000000) AS i WITH i WHERE i % 7 = 0 "
                                 "RETURN count(i) AS n, $m AS m", m=marker).data()

    worker = threading.Thread(target=slow)
    worker.start()
    try:
        ids: list[str] = []
        deadline = time.monotonic() + 10
        while not ids and time.monotonic() < deadline and worker.is_alive():
            with admin.session(database=graph.database) as s:
                ids = [r["transactionId"] for r in s.run("SHOW TRANSACTIONS")
                       if "range(1, 4000000)" in (r["currentQuery"] or "")]
        if not ids:
            pytest.skip("the administrator's query ended before it could be seen")
        with reader.session(database=graph.database) as s:
            seen = s.run("SHOW TRANSACTIONS").data()
            ended = s.run("TERMINATE TRANSACTIONS $ids", ids=ids).data()
        assert {r["username"] for r in seen} == {"reader"}
        assert not any("4000000" in str(r.get("currentQuery")) for r in seen)
        assert [r["message"] for r in ended] == ["Transaction not found."]
    finally:
        worker.join()
        admin.close()
        reader.close()
    assert done["rows"][0]["m"] == marker  # the administrator's query ran to its end


def test_a_runaway_read_is_ended_by_the_server(graph, embedded_server):
    """The reader cannot end its own query, and a client that gives up leaves it running:
    the server's command timeout ends it (6 s for the test session's servers)."""
    started = time.monotonic()
    with pytest.raises(QueryError, match="TransactionTimedOut|timeout"):
        graph.run_cypher("UNWIND range(1, 20000000) AS x UNWIND range(1, 20000000) AS y "
                         "WITH x WHERE x < 0 RETURN count(x) AS n")
    assert time.monotonic() - started < 60
    assert graph.run_cypher("RETURN 1 AS one") == [{"one": 1}]  # and the server goes on


def test_load_csv_reads_no_file_and_no_url_even_as_the_administrator(graph, embedded_server):
    """The embedded server's setting, and the Neo4j configuration of docker-compose.yml and
    the test launcher (no file URLs, every address blocked)."""
    if os.environ.get("NEO4J_URI") and graph.uri == os.environ["NEO4J_URI"]:
        pytest.skip("a Neo4j of the user's own: its file and URL settings are the user's")
    embedded = graph.dialect.name == "arcadedb"
    secrets = _secrets(graph, embedded_server if embedded else None)
    refusal = "disabled" if embedded else "allow_csv_import_from_file_urls|blocked|Invalid URL"
    for url in ("file:///etc/passwd", "/etc/passwd", f"file://{embedded_server.root}/password",
                "http://127.0.0.1:9/x.csv", "http://[::1]:9/x.csv"):
        with pytest.raises(QueryError, match=refusal) as refused:
            graph.run_cypher(f"LOAD CSV FROM '{url}' AS line RETURN line", write=True)
        assert not any(secret in str(refused.value) for secret in secrets), url


def test_the_readers_password_is_owner_only_and_its_group_only_reads(graph, embedded_server):
    if graph.dialect.name != "arcadedb":
        pytest.skip("the reader user is the embedded server's")
    assert graph.reader is not None
    for name in ("password", "reader-password"):
        assert stat.S_IMODE(os.stat(embedded_server.root / name).st_mode) == 0o600
    config = embedded_server.root / "server" / "config"
    group = json.loads((config / "server-groups.json").read_text())
    reader = group["databases"]["insights"]["groups"]["reader"]
    assert reader["access"] == [] and reader["types"] == {"*": {"access": ["readRecord"]}}
    users = [json.loads(line) for line in (config / "server-users.jsonl").read_text().split()]
    (user,) = [u for u in users if u["name"] == "reader"]
    assert user["databases"] == {"insights": ["reader"]}
    assert embedded_server.reader_password() not in json.dumps(users)  # stored hashed


# -- our tokens against ArcadeDB's own lexer -------------------------------------------------

_LEXER = r"""
import json, sys
import jpype
from arcadedb_embedded.jvm import start_jvm

start_jvm()
lexer = jpype.JClass("com.arcadedb.query.opencypher.grammar.Cypher25Lexer")
streams = jpype.JClass("org.antlr.v4.runtime.CharStreams")
names = lexer.VOCABULARY
keywords = [str(names.getSymbolicName(t)) for t in range(1, names.getMaxTokenType() + 1)
            if names.getLiteralName(t) is None]
tokens = [[[str(names.getSymbolicName(t.getType())), int(t.getStartIndex())]
           for t in lexer(streams.fromString(q)).getAllTokens() if t.getChannel() == 0]
          for q in json.load(sys.stdin)]
print(json.dumps({"keywords": keywords, "tokens": tokens}))
"""

_NOT_KEYWORDS = {"SPACE", "SINGLE_LINE_COMMENT", "MULTI_LINE_COMMENT", "DECIMAL_DOUBLE",
                 "UNSIGNED_DECIMAL_INTEGER", "UNSIGNED_HEX_INTEGER", "UNSIGNED_OCTAL_INTEGER",
                 "STRING_LITERAL1", "STRING_LITERAL2", "ESCAPED_SYMBOLIC_NAME", "IDENTIFIER",
                 "EXTENDED_IDENTIFIER", "ARROW_LINE", "ARROW_LEFT_HEAD", "ARROW_RIGHT_HEAD",
                 "ErrorChar"}

# ArcadeDB's keywords that are neither read keywords nor refused: they mean something only
# after a refused verb (CREATE INDEX ... OPTIONS, GRANT ... ON GRAPH), or are types, options
# and function-like words, so they stay free as names. A keyword a new release adds fails
# the test below until it is put in one of the three sets.
INERT = frozenset({
    "ACCESS", "ACTIVE", "ADD", "ADMIN", "ADMINISTRATOR", "ALIAS", "ALIASES",
    "ALL_SHORTEST_PATHS", "ALLREDUCE", "ARRAY", "ASSIGN", "AT", "AUTH", "BINDINGS", "BOOL",
    "BOOLEAN", "BOOSTED", "BOTH", "BREAK", "BUILT", "CASCADE", "CHANGE", "CIDR", "CLOSE",
    "COMMAND", "COMMANDS", "COMPOSITE", "CONSTRAINT", "CONSTRAINTS", "COPY", "CONDITION",
    "CONTINUE", "COSINE", "CREDENTIAL", "CSV", "CURRENT", "CYPHER", "DATA", "DATABASE",
    "DATABASES", "DATE", "DATETIME", "DBMS", "DEALLOCATE", "DEFAULT", "DEFINED", "DESTROY",
    "DOT_METRIC", "DRIVER", "DRYRUN", "DUMP", "DURATION", "EACH", "EDGE", "ENABLE", "ELEMENT",
    "ENABLED", "ENCRYPTED", "EUCLIDEAN", "EUCLIDEAN_SQUARED", "EXECUTABLE", "EXECUTE", "EXIST",
    "EXISTENCE", "ERROR", "FAIL", "FALSE", "FIELDTERMINATOR", "FLOAT", "FLOAT64", "FLOAT32",
    "FOR", "FORWARDING", "FROM", "FULLTEXT", "FUNCTION", "FUNCTIONS", "GRAPH", "GRAPHS",
    "HAMMING", "HEADERS", "HOME", "ID", "IF", "IMPERSONATE", "IMMUTABLE", "INDEXES", "INF",
    "INFINITY", "INT", "INT64", "INT32", "INT16", "INT8", "INTEGER", "INTEGER64", "INTEGER32",
    "INTEGER16", "INTEGER8", "ISOLATION", "KEY", "LABEL", "LABELS", "LANGUAGE", "LEADING",
    "LIST", "LOCAL", "LOOKUP", "MANAGEMENT", "MANHATTAN", "MAP", "IMPLIES", "NAME", "NAMES",
    "NAN", "NEW", "NODE", "NODES", "NORMALIZE", "NOTHING", "NOWAIT", "NULL", "OF", "OIDC",
    "ONLY", "OPTIONS", "OPTION", "PASSWORD", "PASSWORDS", "PLAINTEXT", "POINT", "POPULATED",
    "PRIMARY", "PRIMARIES", "PRIVILEGE", "PRIVILEGES", "PROCEDURE", "PROCEDURES", "PROPERTIES",
    "PROPERTY", "PROVIDER", "PROVIDERS", "RANGE", "READ", "REALLOCATE", "RESET", "REL",
    "RELATIONSHIP", "REPLACE", "REPLICA", "REPLICAS", "REPORT", "REQUIRE", "REQUIRED",
    "RESTRICT", "RETRY", "ROLE", "ROLES", "ROW", "ROWS", "RULE", "RULES", "SCORE", "SEARCH",
    "SEC", "SECOND", "SECONDARY", "SECONDARIES", "SECONDS", "SEEK", "SERVER", "SERVERS",
    "SESSION", "SETTING", "SETTINGS", "SHARD", "SHARDS", "SHORTEST_PATH", "SIGNED", "START",
    "STATUS", "STOP", "STRING", "SUPPORTED", "SUSPENDED", "TARGET", "TEXT", "TIME",
    "TIMESTAMP", "TIMEZONE", "TO", "TOPOLOGY", "TRAILING", "TRAVERSE", "TRIM", "TRUE", "TYPE",
    "TYPES",
    "UNIQUE", "UNIQUENESS", "URL", "USER", "USERS", "VALUE", "VARCHAR", "VECTOR",
    "VECTOR_DISTANCE", "VECTOR_NORM", "VERTEX", "WAIT", "WITHOUT", "WRITE", "ZONE", "ZONED",
})


@pytest.fixture(scope="module")
def arcadedb_lexer():
    pytest.importorskip("arcadedb_embedded", reason="the graph extra is not installed")
    queries = [q.replace("{password}", "/tmp/graph/password") for q, _ in PROBES] + \
        [q for q, _ in READS]
    accepted = []
    for q in queries:
        with contextlib.suppress(ReadOnlyQueryError):
            accepted.append((q, tokenize(q)))
    proc = subprocess.run([sys.executable, "-c", _LEXER], capture_output=True, text=True,
                          input=json.dumps([q for q, _ in accepted]), timeout=120)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    return answer["keywords"], list(zip(accepted, answer["tokens"], strict=True))


@pytest.mark.integration
def test_our_tokens_begin_where_arcadedbs_lexer_begins_them(arcadedb_lexer):
    """Every word, name, string, number and parameter ArcadeDB's own lexer finds in a query
    the tokenizer accepts starts where the tokenizer starts one of the same kind, and that
    lexer finds no error in it. (The tokenizer may find more: a // comment ends at a line
    break that lexer does not know, which only leaves more text to check.)"""
    keywords, lexed = arcadedb_lexer
    kinds = {"ESCAPED_SYMBOLIC_NAME": "name", "STRING_LITERAL1": "string",
             "STRING_LITERAL2": "string", "DECIMAL_DOUBLE": "number",
             "UNSIGNED_DECIMAL_INTEGER": "number", "UNSIGNED_HEX_INTEGER": "number",
             "UNSIGNED_OCTAL_INTEGER": "number", "DOLLAR": "param", "IDENTIFIER": "word"}
    kinds.update({k: "word" for k in keywords if k not in _NOT_KEYWORDS})
    assert len(lexed) > 100
    same = 0
    for (query, ours), theirs in lexed:
        assert all(kind != "ErrorChar" for kind, _ in theirs), query
        mine = {(t.start, t.kind) for t in ours if t.kind != "symbol"}
        param_names = {theirs[k + 1][1] for k, (kind, _) in enumerate(theirs[:-1])
                       if kind == "DOLLAR"}
        found = {(start, kinds[kind]) for kind, start in theirs
                 if kind in kinds and start not in param_names}
        assert found <= mine, query
        same += mine == found
    assert same >= len(lexed) - 5


@pytest.mark.integration
def test_every_keyword_of_arcadedbs_grammar_has_been_decided(arcadedb_lexer):
    keywords, _ = arcadedb_lexer
    spelled = {"LIMITROWS": "LIMIT", "SKIPROWS": "SKIP"}
    decided = (cypher_guard.STARTERS | cypher_guard.CONTINUATIONS | cypher_guard.REFUSED
               | cypher_guard.OPERAND_KEYWORDS | INERT)
    words = {spelled.get(k, k) for k in keywords if k not in _NOT_KEYWORDS}
    assert len(words) > 250
    assert words - decided == set()
