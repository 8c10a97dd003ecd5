"""Quality metrics for routing and dedup: how well predicted groups match true ones.

Pure numpy. Every metric takes two labellings of the same N items (any hashable labels: ints,
strings) and reads them through one contingency table, so 5,000 items cost about a
millisecond and no O(N^2) pair loop exists anywhere.

Legend: N items, R true classes, C predicted clusters; the contingency table ``counts_RC``
holds in ``[r, c]`` the items of true class r put in predicted cluster c. The metrics read
only its nonzero cells (at most N), never the dense R x C table.

* `nmi`: normalised mutual information, MI / mean(H(true), H(pred)) -- the arithmetic mean,
  scikit-learn's default normalisation (Vinh, Epps & Bailey, JMLR 2010, "Information
  theoretic measures for clusterings comparison").
* `purity`: share of items that belong to their cluster's majority class.
* `pair_prf`: precision, recall and F1 over pairs of items placed in the same cluster, the
  usual score of record linkage (each pair of duplicates is one decision).
* `accuracy`: share of items whose predicted name equals their true name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Labels = Sequence[Any] | np.ndarray


def _codes(labels: Labels) -> np.ndarray:
    """(N,) int64 codes 0..C-1 for any hashable labels (strings, ints, numpy values)."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    _, codes = np.unique(arr, return_inverse=True)
    return codes.reshape(-1).astype(np.int64)


def _cells(labels_true: Labels, labels_pred: Labels
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """The nonzero cells of the contingency table: (rows, cols, counts) each (M,) int64, then
    R and C. Sparse, so 5,000 singletons cost O(N log N), not an R x C table."""
    t, p = _codes(labels_true), _codes(labels_pred)
    if len(t) != len(p):
        raise ValueError(f"labellings differ in length: {len(t)} true, {len(p)} predicted")
    if len(t) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, 0, 0
    r, c = int(t.max()) + 1, int(p.max()) + 1
    cell, counts = np.unique(t * c + p, return_counts=True)
    return cell // c, cell % c, counts.astype(np.int64), r, c


def contingency(labels_true: Labels, labels_pred: Labels) -> np.ndarray:
    """(R, C) int64 table: items of each true class (rows) in each predicted cluster (cols).

    Dense, for reading small cases; the metrics below work on its nonzero cells only.
    """
    rows, cols, counts, r, c = _cells(labels_true, labels_pred)
    counts_RC = np.zeros((r, c), dtype=np.int64)
    counts_RC[rows, cols] = counts
    return counts_RC


def _entropy(counts: np.ndarray) -> float:
    """Shannon entropy in nats of the distribution given by non-negative counts."""
    counts = counts[counts > 0].astype(np.float64)
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(labels_true: Labels, labels_pred: Labels) -> float:
    """Normalised mutual information in [0, 1], arithmetic-mean normalisation.

    ``MI(T; P) / ((H(T) + H(P)) / 2)`` in nats. The limit cases follow scikit-learn's
    ``normalized_mutual_info_score``: two labellings that each put everything in one group
    score 1.0 (neither splits the data, so they agree); otherwise MI = 0 scores 0.0.
    """
    rows, cols, counts, r, c = _cells(labels_true, labels_pred)
    if r == c <= 1:
        return 1.0
    n_ij = counts.astype(np.float64)
    n = n_ij.sum()
    a_R = np.bincount(rows, weights=n_ij, minlength=r)
    b_C = np.bincount(cols, weights=n_ij, minlength=c)
    # MI = sum_ij (n_ij / n) log(n * n_ij / (a_i b_j)); the argument is > 0 on nonzero cells
    mi = float((n_ij / n * np.log(n * n_ij / (a_R[rows] * b_C[cols]))).sum())
    mi = max(mi, 0.0)  # rounding can leave -1e-17 where the labellings are independent
    if mi == 0.0:
        return 0.0
    return mi / ((_entropy(a_R) + _entropy(b_C)) / 2)


def purity(labels_true: Labels, labels_pred: Labels) -> float:
    """Share of items in their predicted cluster's majority true class, in (0, 1].

    One cluster per item scores 1.0: purity rewards splitting, so read it beside `nmi`.
    """
    _, cols, counts, _, c = _cells(labels_true, labels_pred)
    if c == 0:
        return 1.0
    majority_C = np.zeros(c, dtype=np.int64)
    np.maximum.at(majority_C, cols, counts)
    return float(majority_C.sum() / counts.sum())


def _pairs(counts: np.ndarray) -> int:
    """Number of unordered pairs within groups of the given sizes: sum n (n - 1) / 2."""
    counts = counts.astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def pair_prf(clusters_pred: Labels, clusters_true: Labels) -> tuple[float, float, float]:
    """Pairwise (precision, recall, F1) of a clustering against the true duplicate groups.

    A pair of items is *predicted* when both share a predicted cluster and *true* when both
    share a true group; true positives are the pairs in both, i.e. sum over contingency cells
    of C(n_ij, 2). Predicted pairs are sum over clusters of C(n_c, 2), true pairs the same
    over groups. When there are no predicted (true) pairs, precision (recall) is 1.0: nothing
    was claimed (nothing could be missed). F1 is 0.0 when precision and recall both are.
    """
    rows, cols, counts, r, c = _cells(clusters_true, clusters_pred)
    tp = _pairs(counts)
    pred_pairs = _pairs(np.bincount(cols, weights=counts, minlength=c))
    true_pairs = _pairs(np.bincount(rows, weights=counts, minlength=r))
    precision = tp / pred_pairs if pred_pairs else 1.0
    recall = tp / true_pairs if true_pairs else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def accuracy(names_true: Labels, names_pred: Labels) -> float:
    """Share of items whose predicted name equals the true name (exact comparison)."""
    t, p = np.asarray(names_true), np.asarray(names_pred)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"names must be two 1-D arrays of one length, got {t.shape}, "
                         f"{p.shape}")
    if len(t) == 0:
        return 1.0
    return float((t == p).mean())
