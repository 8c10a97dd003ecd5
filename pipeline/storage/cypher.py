"""Every Cypher statement the project sends, and the one place servers differ.

Labels and relationship types are constants; every value is a parameter. The statements stay
inside the subset Neo4j 5 and the embedded ArcadeDB server both accept; what differs (the
vector index) is chosen by `Dialect.for_agent` from the server's reported agent string.
"""

from __future__ import annotations

from dataclasses import dataclass

INSIGHT, SOURCE, EXPERT, CONSTELLATION, RUN = "Insight", "Source", "Expert", "Constellation", "Run"
SUPPORTED_BY, PRODUCED_BY, IN_CONSTELLATION = "SUPPORTED_BY", "PRODUCED_BY", "IN_CONSTELLATION"
MEMBER_OF, SIMILAR_TO, DISCOVERED_IN = "MEMBER_OF", "SIMILAR_TO", "DISCOVERED_IN"
LABELS = (INSIGHT, SOURCE, EXPERT, CONSTELLATION, RUN)


# `CREATE VECTOR INDEX ... OPTIONS {indexConfig: ...}` is Neo4j 5.15's syntax (5.11-5.14 had
# only a procedure); every calendar-versioned release (2025.01 on) has it too.
VECTOR_INDEX_SINCE = (5, 15)


def neo4j_version(agent: str) -> tuple[int, ...]:
    """'Neo4j/2026.08.1' -> (2026, 8, 1); an agent with no readable version -> (0,)."""
    _, _, version = agent.partition("/")
    parts = []
    for piece in version.split(" ", 1)[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or (0,)


@dataclass(frozen=True)
class Dialect:
    """What a server accepts beyond the shared subset."""

    name: str  # "neo4j" or "arcadedb"
    vector_index: bool
    # Whether EXPLAIN's summary gives the query's true type ('r', 'rw', 'w', 's'). ArcadeDB's
    # (26.10) reports 'w' for every EXPLAIN, even of a MATCH ... RETURN, and runs none.
    explain_query_type: bool = False

    @classmethod
    def for_agent(cls, agent: str) -> Dialect:
        """ArcadeDB reports e.g. 'Neo4j/5.26.0 compatible (ArcadeDB 26.10.2)'; Neo4j
        'Neo4j/5.26.30', and from 2025 on calendar versions such as 'Neo4j/2026.08.1'."""
        if "arcadedb" in agent.lower():
            return cls("arcadedb", vector_index=False)
        return cls("neo4j", vector_index=neo4j_version(agent) >= VECTOR_INDEX_SINCE,
                   explain_query_type=True)

    def schema(self, vector_dim: int | None = None) -> list[str]:
        """Idempotent DDL: uniqueness on every id, (shard, seq) on insights, optional vectors."""
        ddl = [f"CREATE CONSTRAINT {label.lower()}_id IF NOT EXISTS "
               f"FOR (n:{label}) REQUIRE n.id IS UNIQUE" for label in LABELS]
        ddl.append(f"CREATE INDEX insight_shard_seq IF NOT EXISTS FOR (n:{INSIGHT}) "
                   "ON (n.shard, n.seq)")
        if vector_dim is not None and self.vector_index:
            # DDL takes no parameters; vector_dim is an int from our own config.
            ddl.append(f"CREATE VECTOR INDEX insight_embedding IF NOT EXISTS "
                       f"FOR (n:{INSIGHT}) ON (n.embedding_vector) OPTIONS {{indexConfig: "
                       f"{{`vector.dimensions`: {int(vector_dim)}, "
                       "`vector.similarity_function`: 'cosine'}}")
        return ddl


# Neo4j only: the width of the vector index `Dialect.schema` makes, when it exists.
VECTOR_INDEX_WIDTH = """
SHOW INDEXES YIELD name, type, options WHERE name = 'insight_embedding' AND type = 'VECTOR'
RETURN options.indexConfig.`vector.dimensions` AS width
"""

# A curated batch is written under its shard's lock, so the writer knows which insights are
# new: those are CREATEd with all their edges in one pass over the rows (no insight is looked
# up again by id, and no MERGE on a relationship to a hub such as a Constellation node, which
# costs a scan of the hub's edges on some servers). Edges of insights that already exist
# (merges, replays) are MERGEd, so replaying a batch changes nothing.
EXISTING_INSIGHTS = f"""
UNWIND $ids AS id
MATCH (i:{INSIGHT} {{id: id}})
RETURN collect(i.id) AS ids
"""

MERGE_HUBS = f"""
UNWIND $shards AS shard
MERGE (:{CONSTELLATION} {{id: shard}})
WITH count(*) AS done
MERGE (:{RUN} {{id: $run}})
"""

MERGE_EXPERTS = f"""
UNWIND $experts AS r
MERGE (x:{EXPERT} {{id: r.id}})
ON CREATE SET x.name = r.name, x.model = r.model
"""

# Every new insight has at least one support (the report that created it) and one producing
# expert, so neither UNWIND drops its row before the similar edges are written. Measured on
# the embedded server, warm: about 7,300 insights/s with 6 edges each in batches of 1,000,
# against 5,000 for one statement per edge type matching insights by id again.
CREATE_INSIGHTS = f"""
UNWIND $rows AS r
MATCH (c:{CONSTELLATION} {{id: r.shard}})
MATCH (run:{RUN} {{id: r.run_id}})
CREATE (i:{INSIGHT})
SET i = r.props
CREATE (i)-[:{IN_CONSTELLATION}]->(c)
CREATE (i)-[:{DISCOVERED_IN}]->(run)
WITH i, r.supports AS supports, r.produced AS produced, r.similar AS similar
UNWIND supports AS s
MERGE (src:{SOURCE} {{id: s.source}})
ON CREATE SET src.text = s.text, src.hash = s.hash
CREATE (i)-[e:{SUPPORTED_BY} {{report_id: s.report, weight: s.weight, job_id: s.job,
                                jobs: s.jobs, reports: s.reports, at: s.at,
                                pos: s.pos}}]->(src)
SET e.embedding = s.embedding
WITH DISTINCT i, produced, similar
UNWIND produced AS p
MATCH (x:{EXPERT} {{id: p.expert}})
CREATE (i)-[:{PRODUCED_BY} {{weight: p.weight}}]->(x)
WITH DISTINCT i, similar
UNWIND similar AS n
MATCH (b:{INSIGHT} {{id: n.b}})
CREATE (i)-[:{SIMILAR_TO} {{score: n.score}}]->(b)
"""

MERGE_SUPPORTS = f"""
UNWIND $rows AS r
MATCH (i:{INSIGHT} {{id: r.insight}})
MERGE (s:{SOURCE} {{id: r.source}})
ON CREATE SET s.text = r.text, s.hash = r.hash
MERGE (i)-[e:{SUPPORTED_BY}]->(s)
ON CREATE SET e.report_id = r.report, e.weight = r.weight, e.job_id = r.job,
              e.jobs = r.jobs, e.reports = r.reports, e.embedding = r.embedding, e.at = r.at,
              e.pos = r.pos
ON MATCH SET e.jobs = coalesce(e.jobs, []) + [j IN r.jobs WHERE NOT j IN coalesce(e.jobs, [])],
             e.reports = coalesce(e.reports, [e.report_id])
                         + [x IN r.reports WHERE NOT x IN coalesce(e.reports, [e.report_id])]
"""

# The larger weight wins, so replaying a batch (or merging the same expert twice) is stable.
MERGE_PRODUCED = f"""
UNWIND $rows AS r
MATCH (i:{INSIGHT} {{id: r.insight}})
MATCH (x:{EXPERT} {{id: r.expert}})
MERGE (i)-[e:{PRODUCED_BY}]->(x)
SET e.weight = CASE WHEN e.weight IS NULL OR e.weight < r.weight THEN r.weight
                    ELSE e.weight END
"""

MERGE_SIMILAR = f"""
UNWIND $rows AS r
MATCH (a:{INSIGHT} {{id: r.insight}})
MATCH (b:{INSIGHT} {{id: r.b}})
MERGE (a)-[e:{SIMILAR_TO}]->(b)
SET e.score = r.score
"""

MERGE_MODEL = f"""
UNWIND $rows AS r
MERGE (x:{EXPERT} {{id: r.expert}})
ON CREATE SET x.name = r.name, x.model = r.model
MERGE (c:{CONSTELLATION} {{id: r.constellation}})
MERGE (x)-[:{MEMBER_OF}]->(c)
"""

MERGE_RUN = f"""
MERGE (run:{RUN} {{id: $id}})
ON CREATE SET run.created_at = $created_at, run.config = $config
"""

# Reports already curated: found from their Source nodes (indexed), not by scanning edges.
SUPPORTED_REPORTS = f"""
UNWIND $rows AS r
MATCH (s:{SOURCE} {{id: r.source}})<-[e:{SUPPORTED_BY}]-(i:{INSIGHT})
WHERE r.report IN coalesce(e.reports, [e.report_id])
RETURN r.report AS report, i.id AS insight
"""

# The supports of insights that just gained one, for their medoid text (`rows.medoid_rows`);
# an insight past `rows.MEDOID_MAX_SUPPORT` supports keeps its text.
SUPPORT_EMBEDDINGS = f"""
UNWIND $ids AS id
MATCH (i:{INSIGHT} {{id: id}})-[n:{SUPPORTED_BY}]->()
WITH i, count(n) AS support
WHERE support <= $cap
MATCH (i)-[e:{SUPPORTED_BY}]->(s:{SOURCE})
WITH i, collect([e.embedding, s.text]) AS pairs
RETURN i.id AS id, i.dim AS dim, pairs
"""

SET_TEXTS = f"""
UNWIND $rows AS r
MATCH (i:{INSIGHT} {{id: r.id}})
SET i.text = r.text
"""

# Which insight each item of a job became or joined, with the supervisor's score for it.
JOB_ITEMS = f"""
MATCH (i:{INSIGHT})-[e:{SUPPORTED_BY}]->(s:{SOURCE})
WHERE $job IN coalesce(e.jobs, [e.job_id])
RETURN s.id AS item, i.id AS insight, i.shard AS constellation, e.reports AS reports,
       e.weight AS score, coalesce(i.text, i.summary) AS text
ORDER BY item, constellation
"""

# The supervisor's score of every item of these jobs (each support edge keeps its report's).
ROUTING_SCORES = f"""
MATCH (:{INSIGHT})-[e:{SUPPORTED_BY}]->(:{SOURCE})
WHERE any(j IN coalesce(e.jobs, [e.job_id]) WHERE j IN $jobs)
RETURN e.weight AS score
"""

# What a similarity answer shows of each insight it found.
INSIGHT_DETAILS = f"""
UNWIND $ids AS id
MATCH (i:{INSIGHT} {{id: id}})
OPTIONAL MATCH (i)-[:{SUPPORTED_BY}]->(s:{SOURCE})
RETURN i.id AS id, i.shard AS shard, coalesce(i.text, i.summary) AS summary,
       count(s) AS support,
       collect(s.id)[0..5] AS sources
"""

# `similar --id`: an insight's stored embedding, or a source's text.
LOOKUP = f"""
OPTIONAL MATCH (i:{INSIGHT} {{id: $id}})
OPTIONAL MATCH (s:{SOURCE} {{id: $id}})
RETURN i.embedding AS embedding, i.shard AS shard, s.text AS text,
       i IS NOT NULL AS is_insight, s IS NOT NULL AS is_source
"""

# Insights of these shards that another model drafted (or one before models were recorded).
OTHER_MODELS = f"""
MATCH (i:{INSIGHT}) WHERE i.shard IN $shards AND (i.model IS NULL OR i.model <> $model)
RETURN count(i) AS n
"""

# Shards that hold insights (a scan, for questions over every shard; the pipeline itself
# always names its shard).
SHARDS = f"""
MATCH (i:{INSIGHT})
RETURN collect(DISTINCT i.shard) AS shards
"""

MAX_SEQ = f"""
MATCH (i:{INSIGHT}) WHERE i.shard = $shard
RETURN max(i.seq) AS seq
"""

# The tops of several shards at once: a librarian's catch-up of its own shard and of the
# shards it looks across, one query in its part's transaction. A shard with no insight has
# no row.
SHARD_TOPS = f"""
MATCH (i:{INSIGHT}) WHERE i.shard IN $shards
RETURN i.shard AS shard, max(i.seq) AS seq
"""

CONSTELLATIONS = f"""
MATCH (c:{CONSTELLATION})
RETURN collect(c.id) AS ids
"""

# A cache holds the insights of a shard as wide as it is ($dim), of one model ($model) or of
# all (null): a graph may hold shards written by models of other widths.
COUNT_AFTER = f"""
MATCH (i:{INSIGHT}) WHERE i.shard = $shard AND i.seq > $after
  AND ($dim IS NULL OR i.dim = $dim)
  AND ($model IS NULL OR i.model = $model)
RETURN count(i) AS n
"""

# Pages are seq ranges: served from the (shard, seq) index with no sort (an ORDER BY ...
# LIMIT page ran 3-4x slower on the embedded server); one record per page keeps the driver's
# per-record cost low. Rows of a page come unordered.
PAGE_RANGE = f"""
MATCH (i:{INSIGHT}) WHERE i.shard = $shard AND i.seq > $lo AND i.seq <= $hi
  AND ($dim IS NULL OR i.dim = $dim)
  AND ($model IS NULL OR i.model = $model)
RETURN collect(i.id) AS ids, collect(i.seq) AS seqs, collect(i.embedding) AS embeddings,
       collect(coalesce(i.summary, '')) AS summaries
"""

# A shard's forget count: every forget that removes or re-represents an insight of a shard
# adds one, in its transaction. A cache that saw another count re-reads the shard: catching
# up by seq alone learns of new insights, never of removed or changed ones.
EPOCHS = f"""
MATCH (c:{CONSTELLATION}) WHERE c.id IN $shards
RETURN c.id AS shard, coalesce(c.forgotten, 0) AS epoch
"""

BUMP_EPOCHS = f"""
MATCH (c:{CONSTELLATION}) WHERE c.id IN $shards
SET c.forgotten = coalesce(c.forgotten, 0) + 1
"""

# A user's write (`query --write`, the API's write Cypher) may have removed or changed any
# insight: every shard's count moves, so every cache re-reads what it holds.
BUMP_ALL_EPOCHS = f"""
MATCH (c:{CONSTELLATION})
SET c.forgotten = coalesce(c.forgotten, 0) + 1
"""

# -- forgetting (`pipeline.retract`) --------------------------------------------------------
# Each support edge of these sources, with the jobs and reports that back it; a source with no
# edge has one row with a null insight.
SOURCE_SUPPORTS = f"""
UNWIND $ids AS sid
MATCH (s:{SOURCE} {{id: sid}})
OPTIONAL MATCH (i:{INSIGHT})-[e:{SUPPORTED_BY}]->(s)
RETURN sid AS source, s.hash AS hash, i.id AS insight, i.shard AS shard,
       coalesce(e.jobs, [e.job_id]) AS jobs, coalesce(e.reports, [e.report_id]) AS reports
"""

# The sources a job filed (its support edges name it).
JOB_SOURCES = f"""
MATCH (:{INSIGHT})-[e:{SUPPORTED_BY}]->(s:{SOURCE})
WHERE $job IN coalesce(e.jobs, [e.job_id])
RETURN collect(DISTINCT s.id) AS ids
"""

# Everything an insight's representation is made of: each support's source, stored report
# embedding and text, the reports behind it (the founder's among them), when it arrived (its
# part's time), the jobs that filed it and its place in the part.
INSIGHT_SUPPORTS = f"""
UNWIND $ids AS id
MATCH (i:{INSIGHT} {{id: id}})-[e:{SUPPORTED_BY}]->(s:{SOURCE})
RETURN i.id AS id, i.shard AS shard, i.dim AS dim, i.model AS model, i.seq AS seq,
       i.text AS text, i.summary AS summary, i.run_id AS run_id, i.created_at AS created_at,
       collect([s.id, e.embedding, s.text, coalesce(e.reports, [e.report_id]), e.at,
                coalesce(e.jobs, [e.job_id]), e.pos]) AS supports
"""

# A forget's split: the insights a re-founded one's later supports found without its old
# founder, in the shard and run it was found in; their supports and producing experts then
# move (`MOVE_SUPPORTS` with ``sources``, `MOVE_PRODUCED`).
SPLIT_INSIGHTS = f"""
UNWIND $rows AS r
MATCH (c:{CONSTELLATION} {{id: r.shard}})
CREATE (i:{INSIGHT})
SET i = r.props
CREATE (i)-[:{IN_CONSTELLATION}]->(c)
"""

SPLIT_DISCOVERED = f"""
UNWIND $rows AS r
MATCH (:{INSIGHT} {{id: r.merged}})-[:{DISCOVERED_IN}]->(run:{RUN})
MATCH (i:{INSIGHT} {{id: r.into}})
MERGE (i)-[:{DISCOVERED_IN}]->(run)
"""

# A forget's merge: what supports an insight keeps (those of ``sources``, where a row names
# them: a split), and the experts that produced it, move to the insight its new founder
# restates (which keeps the larger weight of an expert);
# a merged insight itself then goes (`DROP_INSIGHTS`), its SIMILAR_TO edges with it.
MOVE_SUPPORTS = f"""
UNWIND $rows AS r
MATCH (i:{INSIGHT} {{id: r.merged}})-[e:{SUPPORTED_BY}]->(s:{SOURCE})
WHERE r.sources IS NULL OR s.id IN r.sources
MATCH (j:{INSIGHT} {{id: r.into}})
MERGE (j)-[f:{SUPPORTED_BY}]->(s)
ON CREATE SET f.report_id = e.report_id, f.weight = e.weight, f.job_id = e.job_id,
              f.jobs = e.jobs, f.reports = e.reports, f.embedding = e.embedding, f.at = e.at,
              f.pos = e.pos
ON MATCH SET f.jobs = coalesce(f.jobs, [f.job_id]) + [x IN coalesce(e.jobs, [e.job_id])
                                                     WHERE NOT x IN coalesce(f.jobs, [f.job_id])],
             f.reports = coalesce(f.reports, [f.report_id]) + [x IN coalesce(e.reports,
                         [e.report_id]) WHERE NOT x IN coalesce(f.reports, [f.report_id])]
DELETE e
"""

MOVE_PRODUCED = f"""
UNWIND $rows AS r
MATCH (i:{INSIGHT} {{id: r.merged}})-[p:{PRODUCED_BY}]->(x:{EXPERT})
MATCH (j:{INSIGHT} {{id: r.into}})
MERGE (j)-[q:{PRODUCED_BY}]->(x)
SET q.weight = CASE WHEN q.weight IS NULL OR q.weight < p.weight THEN p.weight
                    ELSE q.weight END
"""

DROP_SUPPORTS = f"""
UNWIND $rows AS r
MATCH (i:{INSIGHT} {{id: r.insight}})-[e:{SUPPORTED_BY}]->(s:{SOURCE} {{id: r.source}})
DELETE e
"""

# An edge that other jobs still back keeps them, less the forgotten job's.
THIN_SUPPORTS = f"""
UNWIND $rows AS r
MATCH (i:{INSIGHT} {{id: r.insight}})-[e:{SUPPORTED_BY}]->(s:{SOURCE} {{id: r.source}})
SET e.jobs = r.jobs, e.reports = r.reports, e.job_id = r.jobs[0], e.report_id = r.reports[0]
"""

DROP_INSIGHTS = f"""
UNWIND $ids AS id
MATCH (i:{INSIGHT} {{id: id}})
DETACH DELETE i
"""

# Sources left with no support go, with any edge a user may have added to them.
DROP_BARE_SOURCES = f"""
UNWIND $ids AS id
MATCH (s:{SOURCE} {{id: id}})
OPTIONAL MATCH (s)<-[e:{SUPPORTED_BY}]-()
WITH s, count(e) AS support
WHERE support = 0
DETACH DELETE s
"""

# A row without an embedding changes the text only: the insight keeps the one it has (SET to
# null would remove it, and a cache reading the shard would then lack a row).
REPRESENT = f"""
UNWIND $rows AS r
MATCH (i:{INSIGHT} {{id: r.id}})
SET i.text = r.text, i.summary = r.summary, i.embedding = coalesce(r.embedding, i.embedding)
"""

REPRESENT_VECTOR = f"""
UNWIND $rows AS r
MATCH (i:{INSIGHT} {{id: r.id}})
SET i.text = r.text, i.summary = r.summary, i.embedding = coalesce(r.embedding, i.embedding),
    i.embedding_vector = coalesce(r.vector, i.embedding_vector)
"""

# The stored content of sources about to be ingested again: a changed one is retracted first.
SOURCE_HASHES = f"""
UNWIND $ids AS id
MATCH (s:{SOURCE} {{id: id}})
RETURN s.id AS id, s.hash AS hash, s.text AS text
"""
