"""Topics from embeddings: spherical k-means to find them, class-based TF-IDF to name them.

Legend: N items, D embedding dim, K clusters, V vocabulary terms.

`kmeans` clusters L2-normalised rows by cosine (spherical k-means, Dhillon & Modha 2001):
assign each row to the centroid of highest dot product, move each centroid to the normalised
sum of its rows, repeat until no row changes cluster. Seeds come from k-means++ (Arthur &
Vassilvitskii 2007) drawn with a `torch.Generator`, so one seed gives one answer; of several
restarts the one with the highest total cosine to its centroids wins.

`name_topics` and `describe_topics` score terms by class-based TF-IDF as BERTopic does
(Grootendorst 2022, arXiv:2203.05794): the texts of a cluster are one document, and

    W[c, t] = tf[c, t] * log(1 + A / f[t])

with tf the term's frequency in cluster c (L1-normalised per cluster, as BERTopic's
``ClassTfidfTransformer``; that scaling leaves each cluster's ranking unchanged), f[t] the
term's frequency over all clusters and A the mean number of words per cluster. A term common
to every cluster ("remember", "lecture") scores low everywhere; one frequent in a single
cluster scores high there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# A short list written for this module: function words, pronouns, auxiliaries and the
# placeholders of dictionary glosses ("someone", "something"), none of which names a topic.
_STOPWORD_TEXT = """
a about above across after again against all almost also although always am among an and
another any anyone anything are around as at be became because become been before being
below between both but by can cannot could did do does doing done down during each either
else etc even ever every for from further get gets given go goes had has have having he her
here hers herself him himself his how however i if in into is it its itself just least less
let like made make makes many may me might more most much must my myself near neither no nor
not now of off often on once one ones only onto or other others our ours ourselves out over
own per quite rather really same see several shall she should since so some someone
something sometimes somebody such than that the their theirs them themselves then there
these they this those though through thus to too toward towards under until up upon us
use used uses using usually very via was we well were what when where whether which while
who whom whose why will with within without would yet you your yours yourself yourselves
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())

_WORD = re.compile(r"[^\W\d_]+")  # runs of letters, in any script; digits split words


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens of `text`, stopwords and one-letter tokens dropped."""
    return [w for w in _WORD.findall(text.lower()) if len(w) > 1 and w not in STOPWORDS]


# -- k-means ---------------------------------------------------------------------------------


def _kmeans_pp(x_ND: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """(K, D) initial centroids: k-means++ on squared chordal distance 2 - 2 cos."""
    n = x_ND.shape[0]
    first = torch.randint(n, (1,), generator=gen, device=x_ND.device)
    c_KD = x_ND.new_empty((k, x_ND.shape[1]))
    c_KD[0] = x_ND[first[0]]
    d2_N = (2 - 2 * (x_ND @ c_KD[0])).clamp_min(0)
    for j in range(1, k):
        # One host sync per centroid (initialisation only): all rows equal to chosen centres
        # leave no mass to sample from, and then any row will do.
        weights_N = d2_N if float(d2_N.sum()) > 0 else torch.ones_like(d2_N)
        pick = torch.multinomial(weights_N, 1, generator=gen)
        c_KD[j] = x_ND[pick[0]]
        d2_N = torch.minimum(d2_N, (2 - 2 * (x_ND @ c_KD[j])).clamp_min(0))
    return c_KD


def _update(x_ND: Tensor, labels_N: Tensor, c_KD: Tensor) -> Tensor:
    """(K, D) normalised sums of each cluster's rows; an empty cluster takes the row least
    similar to its own centroid (so k clusters stay k)."""
    k = c_KD.shape[0]
    sums_KD = torch.zeros_like(c_KD).index_add_(0, labels_N, x_ND)
    empty_K = torch.bincount(labels_N, minlength=k) == 0
    n_empty = int(empty_K.sum())  # host sync, once per iteration, outside any forward pass
    if n_empty:
        fit_N = (x_ND * c_KD[labels_N]).sum(dim=1)
        far = torch.topk(fit_N, n_empty, largest=False).indices
        sums_KD[empty_K] = x_ND[far]
    return F.normalize(sums_KD, dim=1)


def kmeans(x_ND: Tensor | np.ndarray, k: int, seed: int = 0, iters: int = 100,
           restarts: int = 4) -> tuple[Tensor, Tensor]:
    """Spherical k-means of the rows of `x_ND` (normalised here) into `k` clusters.

    Args:
        x_ND: (N, D) float rows, torch or numpy; any norm (rows are L2-normalised first).
        k: number of clusters, 1 <= k <= N.
        seed: seeds the `torch.Generator` of the k-means++ draws; the same seed on the same
            device gives the same clustering.
        iters: most Lloyd iterations per restart (it stops earlier once no row moves).
        restarts: independent k-means++ starts; the best total cosine is kept.

    Returns:
        labels_N: (N,) int64 cluster of each row, in [0, k).
        centroids_KD: (K, D) float32 unit-norm centroids, on the device of `x_ND`.
    """
    x_ND = torch.as_tensor(x_ND).to(torch.float32)
    if x_ND.ndim != 2:
        raise ValueError(f"x_ND must be 2-D (N, D), got shape {tuple(x_ND.shape)}")
    x_ND = F.normalize(x_ND, dim=1)
    if not 1 <= k <= x_ND.shape[0]:
        raise ValueError(f"k must be in [1, N={x_ND.shape[0]}], got {k}")
    if iters < 1 or restarts < 1:
        raise ValueError(f"iters and restarts must be >= 1, got {iters} and {restarts}")
    gen = torch.Generator(device=x_ND.device).manual_seed(seed)
    best: tuple[float, Tensor, Tensor] | None = None
    for _ in range(restarts):
        c_KD = _kmeans_pp(x_ND, k, gen)
        labels_N = (x_ND @ c_KD.T).argmax(dim=1)
        for _ in range(iters):
            c_KD = _update(x_ND, labels_N, c_KD)
            new_N = (x_ND @ c_KD.T).argmax(dim=1)
            moved = not torch.equal(new_N, labels_N)  # host sync: the convergence test
            labels_N = new_N
            if not moved:
                break
        score = float((x_ND * c_KD[labels_N]).sum())
        if best is None or score > best[0]:
            best = (score, labels_N, c_KD)
    assert best is not None
    return best[1], best[2]


# -- naming ----------------------------------------------------------------------------------


def class_tfidf(texts: Sequence[str], labels: Sequence[int] | np.ndarray | Tensor
                ) -> tuple[np.ndarray, list[str]]:
    """Class-based TF-IDF scores of every term in every cluster (see the module docstring).

    Args:
        texts: N strings.
        labels: (N,) int cluster of each text, in [0, K) with K = max + 1.

    Returns:
        scores_KV: (K, V) float64, 0 where a term does not occur in a cluster.
        vocab: the V terms, sorted alphabetically (column order of `scores_KV`).
    """
    labels_N = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels_N) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(labels_N)} labels")
    if len(labels_N) and labels_N.min() < 0:
        raise ValueError(f"labels must be >= 0, got {int(labels_N.min())}")
    k = int(labels_N.max()) + 1 if len(labels_N) else 0
    tokens = [tokenize(t) for t in texts]
    vocab = sorted({w for ws in tokens for w in ws})
    index = {w: i for i, w in enumerate(vocab)}
    rows = np.repeat(labels_N, [len(ws) for ws in tokens])
    cols = np.fromiter((index[w] for ws in tokens for w in ws), dtype=np.int64,
                       count=len(rows))
    counts_KV = np.bincount(rows * len(vocab) + cols,
                            minlength=k * len(vocab)).reshape(k, len(vocab)).astype(np.float64)
    words_K = counts_KV.sum(axis=1, keepdims=True)
    tf_KV = np.divide(counts_KV, words_K, out=np.zeros_like(counts_KV), where=words_K > 0)
    f_V = counts_KV.sum(axis=0)
    idf_V = np.log(1 + words_K.mean() / np.maximum(f_V, 1))
    return tf_KV * idf_V, vocab


def _ranked_terms(texts: Sequence[str], labels: Sequence[int] | np.ndarray | Tensor
                  ) -> list[list[str]]:
    """Each cluster's terms, best c-TF-IDF first (ties alphabetical), absent terms left out."""
    scores_KV, vocab = class_tfidf(texts, labels)
    ranked = []
    for scores_V in scores_KV:
        order = np.argsort(-scores_V, kind="stable")  # stable: vocab is alphabetical
        ranked.append([vocab[i] for i in order if scores_V[i] > 0])
    return ranked


def name_topics(texts: Sequence[str], labels: Sequence[int] | np.ndarray | Tensor,
                top_n: int = 3) -> list[str]:
    """A distinct name for each cluster, its top c-TF-IDF terms joined by '-'.

    ``name_topics(texts, labels)[c]`` names cluster c, e.g. "sleep-memory-recall". Clusters
    whose names collide take further terms, one at a time, until the names differ; any that
    still collide (no terms left) get "-<c>" appended. A cluster with no terms (empty, or
    only stopwords) is "topic-<c>".

    Args:
        texts: N strings. labels: (N,) int cluster of each, in [0, K). top_n: terms per name.

    Returns:
        K names, indexed by cluster.
    """
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    ranked = _ranked_terms(texts, labels)
    width = [top_n] * len(ranked)

    def name(c: int) -> str:
        return "-".join(ranked[c][:width[c]]) or f"topic-{c}"

    names = [name(c) for c in range(len(ranked))]
    while True:
        grew = False
        for n in {n for n in names if names.count(n) > 1}:
            for c in (c for c, m in enumerate(names) if m == n):
                if width[c] < len(ranked[c]):
                    width[c] += 1
                    grew = True
        if not grew:
            break
        names = [name(c) for c in range(len(ranked))]
    seen: set[str] = set()
    for c, n in enumerate(names):
        if n in seen:
            names[c] = f"{n}-{c}"
        seen.add(names[c])
    return names


def describe_topics(texts: Sequence[str], labels: Sequence[int] | np.ndarray | Tensor,
                    top_n: int = 8) -> list[str]:
    """A short description of each cluster: its top `top_n` c-TF-IDF terms, comma-separated
    (e.g. "sleep, memory, recall, hippocampus"); "" for a cluster with no terms."""
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    return [", ".join(terms[:top_n]) for terms in _ranked_terms(texts, labels)]
