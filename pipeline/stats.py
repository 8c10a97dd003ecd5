"""Run statistics: expert and constellation usage, routing entropy, dedup rate of a run,
from its batches' metrics in SQL (`ledger.run_rows`), and a chart of them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sqlalchemy.orm import sessionmaker

from pipeline.errors import PipelineError
from pipeline.storage import ledger


@dataclass
class RunStats:
    run_id: str
    jobs: int
    batches: int
    items: int
    reports: int
    new_insights: int
    merged: int
    dedup_rate: float
    routing_entropy: float  # mean over batches, nats
    balance_loss: float
    expert_usage: dict[str, float]  # expert -> share of token assignments
    constellation_usage: dict[str, float]  # constellation -> share of draft reports
    members: dict[str, list[str]] = field(default_factory=dict)  # constellation -> experts

    @property
    def choices(self) -> int:
        """How many experts a token chooses among: its constellation's members (the largest
        constellation), or every expert without constellations."""
        sizes = [len(m) for m in self.members.values()] or [len(self.expert_usage)]
        return max(max(sizes), 1)

    @property
    def reachable_entropy(self) -> float:
        """The routing entropy routing can reach: ln of `choices`."""
        return math.log(self.choices)

    def constellations_of(self, expert: str) -> list[str]:
        return [c for c, experts in self.members.items() if expert in experts]

    def starved(self, fraction: float = 0.25) -> list[str]:
        """In words: each constellation drawing under ``fraction`` of an even share of the
        reports, and each expert drawing under ``fraction`` of an even share of its
        constellations' assignments."""
        notes = []
        groups = len(self.constellation_usage) or 1
        for name, share in self.constellation_usage.items():
            if share < fraction / groups:
                notes.append(f"constellation {name} is starved: {share:.1%} of the reports, "
                             f"against {1 / groups:.1%} if they were even")
        for expert, share in self.expert_usage.items():
            homes = self.constellations_of(expert)
            expected = sum(self.constellation_usage.get(c, 0.0) / len(self.members[c])
                           for c in homes) if homes else 1 / max(len(self.expert_usage), 1)
            if expected > 0 and share < fraction * expected:
                notes.append(f"expert {expert} ({', '.join(homes) or 'no constellation'}) is "
                             f"starved: {share:.1%} of assignments, against {expected:.1%} "
                             "even within its constellation")
        return notes


# An item whose chosen constellation got under half the supervisor's probability fits none
# well. On examples/texts.jsonl 18 of 300 items fall below it, 7 of them misfiled (6% of
# all items are misfiled; the well-filed median score is 0.95).
WEAK_FIT = 0.5


def confidence_lines(scores: list[float], weak: float = WEAK_FIT) -> list[str]:
    """The distribution of routing scores in words: quantiles, and how many fit nothing."""
    if not scores:
        return ["routing confidence: no item of this run is in the graph"]
    ordered = sorted(scores)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    below = sum(s < weak for s in ordered)
    return [f"routing confidence (the supervisor's probability of each item's constellation): "
            f"p10 {q(0.1):.2f}  median {q(0.5):.2f}  p90 {q(0.9):.2f}",
            f"{below} of {len(ordered)} items ({below / len(ordered):.1%}) fit no constellation "
            f"well (score < {weak})" + ("; the constellations may not cover this data"
                                        if below > 0.2 * len(ordered) else "")]


def _mean(xs: list[float | None]) -> float:
    """The mean of the figures there are: a batch whose figure came out NaN or infinite is
    recorded with NULL (`ledger.record_routing`) and left out, not averaged in."""
    known = [x for x in xs if x is not None]
    return sum(known) / len(known) if known else 0.0


def run_stats(Session: sessionmaker, run_id: str | None = None) -> RunStats:
    """Routing and dedup figures of a run (default: the latest) from its batches' metrics."""
    rows = ledger.run_rows(Session, run_id)
    items = sum(n for n, _ in rows.batches)
    usage: dict[str, float] = {}
    for n, m in rows.batches:  # weighted by the batch's items
        for expert, share in m.expert_usage.items():
            if share is not None:
                usage[expert] = usage.get(expert, 0.0) + share * n / max(items, 1)
    reports = sum(m.reports for _, m in rows.batches)
    merged = sum(m.merged for _, m in rows.batches)
    total_parts = sum(n for _, n in rows.shard_reports) or 1
    try:
        members = ledger.run_knowledge(Session, rows.run_id).constellations
    except PipelineError:  # a run recorded without its model: no membership to show
        members = {}
    return RunStats(rows.run_id, rows.jobs, len(rows.batches), items, reports,
                    sum(m.new_insights for _, m in rows.batches), merged,
                    merged / reports if reports else 0.0,
                    _mean([m.routing_entropy for _, m in rows.batches]),
                    _mean([m.balance_loss for _, m in rows.batches]), usage,
                    {shard: n / total_parts for shard, n in sorted(rows.shard_reports)},
                    members)


def plot(st: RunStats, path: str) -> None:
    """Expert and constellation usage as two bar charts in one PNG."""
    try:
        import matplotlib
    except ImportError as err:
        raise PipelineError("--plot needs matplotlib: pip install 'moe-pipeline[plot]'") \
            from err
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    left.bar(list(st.expert_usage), [100 * v for v in st.expert_usage.values()],
             color="#4c72b0")
    left.axhline(100 / max(len(st.expert_usage), 1), color="grey", linestyle="--",
                 label="uniform")
    left.set(title="expert usage", ylabel="% of token assignments")
    left.legend()
    left.tick_params(axis="x", rotation=45)
    right.bar(list(st.constellation_usage), [100 * v for v in st.constellation_usage.values()],
              color="#55a868")
    right.set(title="constellation usage", ylabel="% of draft reports")
    fig.suptitle(f"run {st.run_id[:12]}: entropy {st.routing_entropy:.2f} nats, "
                 f"dedup rate {st.dedup_rate:.0%}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
