"""Lexical similarity: character n-gram MinHash beside the sentence embedding.

Legend: N, M texts, P MinHash slots (permutations), S shingles of a chunk of texts.

A sentence encoder sees "lanyon" and "lanyom" as different tokens, and ranks the records of
two different people with the same street and birth year as close: on FEBRL 2 (person records
with corrupted duplicates) MiniLM cosine alone reaches pair F1 0.79 at its best threshold. The
Jaccard similarity of two texts' character n-gram sets does better (0.997): one typo changes
at most n shingles, and a different name, date or number changes many. MinHash stores that set in P
integers per text, and the fraction of equal slots estimates the Jaccard similarity (Broder,
"On the resemblance and containment of documents", 1997), so the signature can sit beside the
embedding of each insight (P=128: 512 bytes as uint32, two thirds of a 384-dim fp16
embedding).

Every hash here is fixed: shingles by 64-bit BLAKE2b (never Python's salted ``hash()``),
slot functions by parameters that are themselves BLAKE2b of (seed, slot), not drawn from a
numpy generator whose stream may change between numpy versions. A signature written by one
process, or one release, compares with one computed by another.

`hybrid_similarity` is the dedup score: cosine, raised to the lexical evidence where the
cosine already says "plausibly the same thing" (see its docstring for the measurements).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError, InputShapeError

# p = 2^31 - 1, a Mersenne prime: x < p and a < p keep a*x + b below 2^62, inside int64, and
# every slot value fits a uint32 for storage.
PRIME = (1 << 31) - 1
# The slot value of an empty text: unreachable by (a*x + b) mod p, so an empty text matches
# only another empty text (Jaccard of two empty sets taken as 1, of one empty set as 0).
EMPTY_SLOT = PRIME
# Shingle rows hashed per step: (S, P) int64 is 4 MiB at P=128, inside a core's cache; 10k
# texts of ~100 chars took 1.16 s at 1 << 12 and 2.07 s at 1 << 16 (AMD EPYC, 2 cores).
_CHUNK_SHINGLES = 1 << 12

_NON_WORD = re.compile(r"[\W_]+")


def normalize(text: str) -> str:
    """Casefold, NFKC, and every run of whitespace or punctuation as one space, stripped.

    NFKC, casefold, NFKC again: casefolding can undo a normal form (U+01F0 folds to j and a
    combining caron), so the second pass makes the result a fixed point; close to the Unicode
    Standard's compatibility caseless match (ch. 3.13, D146), in composed form.
    """
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return _NON_WORD.sub(" ", text).strip()


def shingles(text: str, n: int = 3) -> frozenset[str]:
    """The set of character n-grams of the normalised text, padded with n-1 spaces each side.

    The padding (padded q-grams, as in Christen, "Data Matching", Springer 2012) gives a
    one-letter text n shingles and puts every character, first and last included, in exactly
    n of them. An empty text has no shingles.
    """
    if n < 1:
        raise ValueError(f"shingle size n must be >= 1, got {n}")
    text = normalize(text)
    if not text:
        return frozenset()
    pad = " " * (n - 1)
    text = pad + text + pad
    return frozenset(text[i:i + n] for i in range(len(text) - n + 1))


def ngram_jaccard(a: str, b: str, n: int = 3) -> float:
    """Exact Jaccard similarity |A ∩ B| / |A ∪ B| of two texts' shingle sets (1 for two empty)."""
    sa, sb = shingles(a, n), shingles(b, n)
    union = len(sa | sb)
    return 1.0 if union == 0 else len(sa & sb) / union


def slot_params_P(num_perm: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Universal hash parameters ``a_P`` in [1, p) and ``b_P`` in [0, p), (P,) int64 each.

    h_k(x) = (a_k x + b_k) mod p is the Carter-Wegman family ("Universal classes of hash
    functions", 1979); the parameters come from BLAKE2b so they never depend on a numpy RNG.
    """
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    words = np.frombuffer(b"".join(
        hashlib.blake2b(f"minhash:{seed}:{k}".encode(), digest_size=16).digest()
        for k in range(num_perm)), dtype="<u8").reshape(num_perm, 2)
    a_P = (words[:, 0] % np.uint64(PRIME - 1) + np.uint64(1)).astype(np.int64)
    b_P = (words[:, 1] % np.uint64(PRIME)).astype(np.int64)
    return a_P, b_P


def _shingle_hashes(grams: frozenset[str]) -> np.ndarray:
    """(S,) int64 in [0, p): 64-bit BLAKE2b of each shingle's UTF-8 bytes, mod p."""
    digests = b"".join(hashlib.blake2b(g.encode(), digest_size=8).digest() for g in grams)
    return (np.frombuffer(digests, dtype="<u8") % np.uint64(PRIME)).astype(np.int64)


def minhash_NP(texts: Sequence[str], num_perm: int = 128, seed: int = 0,
               n: int = 3) -> np.ndarray:
    """MinHash signatures of the texts' n-gram shingle sets: (N, P) uint32.

    Slot k of text i is min over its shingles x of (a_k x + b_k) mod p (Broder 1997). The
    linear family is only approximately min-wise independent, which biases the estimate
    slightly; tests/test_lexical.py bounds its error against exact Jaccard at P=256. An empty
    text's slots are all `EMPTY_SLOT`. Same texts, num_perm, seed and n give the same array in
    any process. Cost is linear in characters: about 1 s per million shingles at P=128.
    """
    a_P, b_P = slot_params_P(num_perm, seed)
    sig_NP = np.full((len(texts), num_perm), EMPTY_SLOT, dtype=np.uint32)
    hashed = [_shingle_hashes(shingles(t, n)) for t in texts]
    rows_R = np.array([i for i, x_S in enumerate(hashed) if x_S.size], dtype=np.int64)
    if rows_R.size == 0:
        return sig_NP
    sizes_R = np.array([hashed[i].size for i in rows_R])
    # A chunk holds the texts whose first shingle falls in it: at most _CHUNK_SHINGLES plus
    # one text's shingles.
    chunk_R = (np.cumsum(sizes_R) - sizes_R) // _CHUNK_SHINGLES
    for c in np.unique(chunk_R):
        rows = rows_R[chunk_R == c]
        x_S = np.concatenate([hashed[i] for i in rows])
        starts = np.concatenate([[0], np.cumsum(sizes_R[chunk_R == c])[:-1]])
        h_SP = (x_S[:, None] * a_P[None, :] + b_P[None, :]) % PRIME
        sig_NP[rows] = np.minimum.reduceat(h_SP, starts, axis=0)
    return sig_NP


def jaccard_estimate(sig_a_NP: np.ndarray, sig_b_MP: np.ndarray) -> np.ndarray:
    """Estimated Jaccard of every pair: fraction of equal slots, (N, M) float32.

    Slot by slot, so the working set is (N, M) rather than (N, M, P).
    """
    if sig_a_NP.ndim != 2 or sig_b_MP.ndim != 2 or sig_a_NP.shape[1] != sig_b_MP.shape[1]:
        raise InputShapeError("sig_b_MP", sig_b_MP.shape,
                              f"(M, {sig_a_NP.shape[-1]}) like sig_a_NP {sig_a_NP.shape}")
    num_perm = sig_a_NP.shape[1]
    equal_NM = np.zeros((sig_a_NP.shape[0], sig_b_MP.shape[0]),
                        dtype=np.min_scalar_type(num_perm))  # a count of at most P
    for k in range(num_perm):
        equal_NM += sig_a_NP[:, k, None] == sig_b_MP[None, :, k]
    return equal_NM.astype(np.float32) / np.float32(num_perm)


def jaccard_rows(sig_a_KP: np.ndarray, sig_b_KP: np.ndarray) -> np.ndarray:
    """Estimated Jaccard of row k of one with row k of the other, (K,) float32.

    For candidate pairs only, e.g. each report against its cosine top-1 in the cache.
    """
    if sig_a_KP.shape != sig_b_KP.shape:
        raise InputShapeError("sig_b_KP", sig_b_KP.shape, f"{sig_a_KP.shape} like sig_a_KP")
    return (sig_a_KP == sig_b_KP).mean(axis=1, dtype=np.float32)


@dataclass(frozen=True)
class HybridThresholds:
    """The dedup rule: merge at ``cos >= .cos`` OR (``lex >= .lex`` AND ``cos >= .cos_floor``).

    Defaults from ``bench/lexical_thresholds.py`` (MiniLM-L6 cosine, P=128 MinHash of
    3-grams); see `hybrid_similarity` for what was measured.
    """

    cos: float = 0.88
    lex: float = 0.36
    cos_floor: float = 0.45

    def __post_init__(self) -> None:
        if not -1.0 < self.cos <= 1.0:
            raise ConfigError("cos", self.cos, "a cosine in (-1, 1]")
        if not 0.0 < self.lex < 1.0:
            raise ConfigError("lex", self.lex, "a Jaccard similarity in (0, 1)")
        if not -1.0 <= self.cos_floor <= self.cos:
            raise ConfigError("cos_floor", self.cos_floor, f"in [-1, cos={self.cos}]")


def hybrid_similarity(cos_NM: np.ndarray, lex_NM: np.ndarray,
                      thresholds: HybridThresholds = HybridThresholds()) -> np.ndarray:
    """Cosine, raised where the lexical rule merges: float64, the inputs' broadcast shape.

    A pair with ``lex >= t.lex`` and ``cos >= t.cos_floor`` scores
    ``max(cos, t.cos + (lex - t.lex) * (1 - t.cos) / (1 - t.lex))``: the lexical scale
    mapped linearly from [t.lex, 1] onto [t.cos, 1], so the score is >= ``t.cos`` exactly when
    the rule merges, and the best leader is still the one with the highest score. Every other
    pair keeps its cosine, so below the merge threshold (the librarian's SIMILAR_TO band)
    nothing changes, and a pair cosine alone would merge is never lost: paraphrases share few
    character n-grams, so lexical agreement must be a second road to a merge, not a toll on
    the first. float64 because the score meets a Python-float threshold: in float32 a pair at
    exactly ``lex == t.lex`` would round to just under ``t.cos`` and not merge.

    Measured (bench/lexical_thresholds.py: MiniLM-L6, P=128, greedy leaders, pair F1):
    on FEBRL 2 (5000 person records) cosine alone peaks at 0.788 (t=0.83: the closest
    records of different people reach cosine 0.9), Jaccard alone at 0.997 (t=0.30), this
    rule at its defaults 0.994; on examples/texts.jsonl (restated notes) all three reach 1.0,
    cosine alone only on t in [0.70, 0.81]. A weighted mix w*cos + (1-w)*lex does as well on
    both sets only at w <= 0.4, where even cosine 1.0 needs Jaccard 0.15-0.3 to merge, a toll
    paraphrases cannot pay; this rule's F1 is never below cosine's at the same threshold (on
    all three sets, 40 hand-written paraphrases the third). The cosine floor keeps apart
    notes that share only a note-taker's suffix ("... See the chapter summary.": Jaccard up
    to 0.41 at cosine 0.09-0.72), which lets ``t.lex`` sit anywhere in [0.33, 0.38] rather
    than [0.36, 0.38].
    """
    t = thresholds
    cos_NM, lex_NM = np.asarray(cos_NM, np.float64), np.asarray(lex_NM, np.float64)
    raised = t.cos + (lex_NM - t.lex) * ((1.0 - t.cos) / (1.0 - t.lex))
    lexical = (lex_NM >= t.lex) & (cos_NM >= t.cos_floor)
    return np.where(lexical, np.maximum(cos_NM, raised), cos_NM)
