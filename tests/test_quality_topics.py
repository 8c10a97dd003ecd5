"""Quality metrics against scikit-learn and hand counts; k-means and topic names on planted data.

The references are written from the definitions (a pair loop, sklearn's implementation, sums
done by hand in comments), not from the code under test.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import forkrun
import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from pipeline.quality import accuracy, contingency, nmi, pair_prf, purity
from pipeline.topics import class_tfidf, describe_topics, kmeans, name_topics, tokenize

ROOT = Path(__file__).resolve().parents[1]


# -- metrics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_nmi_matches_sklearn_on_random_labellings(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    t = rng.integers(0, int(rng.integers(1, 8)), n)
    p = rng.integers(0, int(rng.integers(1, 12)), n)
    assert nmi(t, p) == pytest.approx(normalized_mutual_info_score(t, p), abs=1e-12)
    # correlated labellings too, where NMI is far from 0
    q = np.where(rng.random(n) < 0.8, t, p)
    assert nmi(t, q) == pytest.approx(normalized_mutual_info_score(t, q), abs=1e-12)


def test_nmi_hand_cases_and_label_invariance():
    assert nmi([0, 0, 1, 1], [5, 5, 9, 9]) == pytest.approx(1.0)  # same partition, renamed
    assert nmi(["a", "a", "b", "b"], [0, 1, 0, 1]) == 0.0  # independent: MI = 0
    assert nmi([0, 0, 0], [1, 1, 1]) == 1.0  # neither splits the data (sklearn's limit case)
    assert nmi([0, 0, 1, 1], [0, 0, 0, 0]) == 0.0
    # true {a,a,b,b}, pred {0,0,0,1}: MI = 1/2 log 4/3 + 1/4 log 2/3 + 1/4 log 2,
    # H(true) = log 2, H(pred) = -(3/4 log 3/4 + 1/4 log 1/4)
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    h = (math.log(2) - 0.75 * math.log(0.75) - 0.25 * math.log(0.25)) / 2
    assert nmi(list("aabb"), [0, 0, 0, 1]) == pytest.approx(mi / h)


def test_purity_counts_each_clusters_majority():
    # cluster 0 = {a, a}: 2; cluster 1 = {a, b, b, c}: 2 -> 4 / 6
    assert purity(list("aaabbc"), [0, 0, 1, 1, 1, 1]) == pytest.approx(4 / 6)
    assert purity(list("abc"), [0, 1, 2]) == 1.0
    assert purity(list("aabb"), [7, 7, 7, 7]) == 0.5


def _pairs_by_loop(pred, true):
    same_p = {(i, j) for i, j in itertools.combinations(range(len(pred)), 2) if pred[i] == pred[j]}
    same_t = {(i, j) for i, j in itertools.combinations(range(len(true)), 2) if true[i] == true[j]}
    tp = len(same_p & same_t)
    precision = tp / len(same_p) if same_p else 1.0
    recall = tp / len(same_t) if same_t else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def test_pair_prf_hand_case():
    # pred pairs: C(3,2) + C(2,2) = 4; true pairs: 1 + 3 = 4; shared: (0,1) and (3,4) -> 2
    assert pair_prf([0, 0, 0, 1, 1], [0, 0, 1, 1, 1]) == pytest.approx((0.5, 0.5, 0.5))
    assert pair_prf([0, 1, 2], [0, 1, 2]) == (1.0, 1.0, 1.0)  # all singletons: nothing to find
    assert pair_prf([0, 1, 2], [0, 0, 1]) == (1.0, 0.0, 0.0)  # claimed nothing, missed one
    assert pair_prf([0, 0, 0], [0, 1, 2]) == (0.0, 1.0, 0.0)


@pytest.mark.parametrize("seed", range(4))
def test_pair_prf_matches_a_pair_loop(seed):
    rng = np.random.default_rng(seed)
    n = 60
    true = rng.integers(0, 20, n)
    pred = np.where(rng.random(n) < 0.7, true, rng.integers(0, 25, n))
    assert pair_prf(pred, true) == pytest.approx(_pairs_by_loop(list(pred), list(true)))


def test_pair_prf_on_5000_items_is_instant():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 3000, 5000)
    pred = np.where(rng.random(5000) < 0.9, true, rng.integers(0, 3000, 5000))
    start = time.perf_counter()
    p, r, f = pair_prf(pred, true)
    assert time.perf_counter() - start < 0.5
    assert 0 < p <= 1 and 0 < r <= 1 and 0 < f <= 1


def test_accuracy_and_contingency():
    assert accuracy(["math", "vision", "math"], ["math", "math", "math"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="one length"):
        accuracy(["a"], ["a", "b"])
    assert contingency(list("aab"), [1, 0, 0]).tolist() == [[1, 1], [1, 0]]


# -- k-means ---------------------------------------------------------------------------------


def _planted(k=5, per=40, dim=32, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres_KD = torch.nn.functional.normalize(torch.randn(k, dim, generator=g), dim=1)
    truth_N = torch.arange(k).repeat_interleave(per)
    x_ND = centres_KD[truth_N] + noise * torch.randn(k * per, dim, generator=g)
    perm = torch.randperm(k * per, generator=g)
    return x_ND[perm], truth_N[perm]


def test_kmeans_finds_planted_clusters_deterministically():
    x_ND, truth_N = _planted()
    labels_N, c_KD = kmeans(x_ND, 5, seed=3)
    assert labels_N.dtype == torch.int64 and labels_N.shape == (200,)
    assert c_KD.shape == (5, 32)
    torch.testing.assert_close(c_KD.norm(dim=1), torch.ones(5))
    assert nmi(truth_N.numpy(), labels_N.numpy()) > 0.95
    again_N, again_KD = kmeans(x_ND.numpy() * 7.0, 5, seed=3)  # numpy, any row norm
    assert torch.equal(labels_N, again_N)
    torch.testing.assert_close(c_KD, again_KD)


def test_kmeans_keeps_k_clusters_and_checks_its_arguments():
    x_ND, _ = _planted(k=3, per=10)
    labels_N, _ = kmeans(x_ND, 8, seed=0, restarts=1)
    assert labels_N.unique().numel() == 8  # empty clusters are reseeded, not dropped
    with pytest.raises(ValueError, match="k must be"):
        kmeans(x_ND, 31)
    with pytest.raises(ValueError, match="2-D"):
        kmeans(x_ND[0], 1)


# -- topic names -----------------------------------------------------------------------------


PLANTED = {0: ("sleep", "memory", "recall"), 1: ("rain", "storm", "cloud"),
           2: ("prime", "integer", "divisor")}
FILLER = ["note", "lecture", "summary", "review", "point", "chapter", "remember", "key"]


def _planted_texts(seed=0):
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for c, words in PLANTED.items():
        for _ in range(30):
            picked = list(rng.choice(words, 2, replace=False)) + list(rng.choice(FILLER, 3))
            picked += [words[0]]  # the first planted word is the most frequent
            rng.shuffle(picked)
            texts.append("The " + " and the ".join(picked) + ".")
            labels.append(c)
    return texts, labels


def test_name_topics_names_clusters_by_their_planted_words():
    texts, labels = _planted_texts()
    names = name_topics(texts, labels)
    for c, words in PLANTED.items():
        assert set(names[c].split("-")) == set(words)
        assert names[c].split("-")[0] == words[0]
    described = describe_topics(texts, labels, top_n=3)
    assert [set(d.split(", ")) for d in described] == [set(w) for w in PLANTED.values()]


def test_name_topics_keeps_names_distinct():
    texts = ["apple banana cherry date", "apple banana cherry elder",
             "apple banana cherry", "apple banana cherry", "the of and"]
    names = name_topics(texts, [0, 1, 2, 3, 6], top_n=3)
    assert len(names) == 7 and len(set(names)) == 7
    assert names[5] == "topic-5"  # no member
    assert names[6] == "topic-6"  # only stopwords


def test_class_tfidf_follows_the_bertopic_formula():
    scores_KV, vocab = class_tfidf(["apple apple banana", "banana cherry"], [0, 1])
    assert vocab == ["apple", "banana", "cherry"]
    # A = (3 + 2) / 2 words per cluster; f = apple 2, banana 2, cherry 1
    a = 2.5
    expected = [[2 / 3 * math.log(1 + a / 2), 1 / 3 * math.log(1 + a / 2), 0.0],
                [0.0, 1 / 2 * math.log(1 + a / 2), 1 / 2 * math.log(1 + a / 1)]]
    np.testing.assert_allclose(scores_KV, expected)
    assert tokenize("The Hippocampus's role, in 2 words!") == ["hippocampus", "role", "words"]


# -- the benchmark ---------------------------------------------------------------------------


@pytest.mark.integration  # the benchmark in a subprocess
@pytest.mark.slow
def test_quality_bench_quick_prints_the_shared_json_shape():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = forkrun.run([sys.executable, "bench/quality.py", "--quick", "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["bench"] == "quality"
    assert set(record) >= {"device", "config", "results", "references", "ratios", "targets"}
    refs = record["references"]
    assert 0 < refs["texts_kmeans_nmi"] <= 1
    assert 0 < refs["texts_nearest_name_accuracy"] <= 1
    assert 0.5 <= refs["texts_leader_best_t"] <= 0.95
    # The pipeline's own figures, measured through the real code: meaning, not speed, so a
    # regression of the routing or the dedup shows here.
    res = record["results"]
    assert res["texts_zero_shot_nmi"] >= 0.75 and res["texts_supervised_accuracy"] >= 0.9
    assert res["texts_dedup_precision"] >= 0.97 and res["texts_dedup_f1"] >= 0.97
    # read from the graph by name, with the constellations given in reversed order
    assert res["texts_supervised_shuffled_graph_name_accuracy"] >= 0.9
