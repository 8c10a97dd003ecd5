"""Lexical similarity: normalisation, shingles, MinHash against its definition, the hybrid rule.

References are written from the definitions (Broder 1997's MinHash, Carter-Wegman hashing,
Jaccard of padded 3-gram sets counted by hand), not from the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import lexical
from pipeline.errors import ConfigError, InputShapeError
from pipeline.lexical import (
    EMPTY_SLOT,
    PRIME,
    HybridThresholds,
    hybrid_similarity,
    jaccard_estimate,
    jaccard_rows,
    minhash_NP,
    ngram_jaccard,
    normalize,
    shingles,
    slot_params_P,
)

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["jacob lanyon 5 milne cove wellwod", "jacob lanyom 5 milne cove wellwood",
         "sarah bruhn 44 forbes street", "The derivative measures how fast a function changes.",
         "x", ""]


def test_normalize_folds_case_width_ligatures_and_punctuation():
    assert normalize("  Héllo,  WORLD!!\t(x)_y ") == "héllo world x y"
    assert normalize("ＡＢＣ １２３") == "abc 123"  # NFKC: full-width forms
    assert normalize("ﬁle") == "file"  # NFKC: the ligature
    assert normalize("STRASSE") == normalize("Straße") == "strasse"  # casefold, not lower
    # U+01F0 casefolds to j + combining caron; the second NFKC composes it back.
    assert normalize("ǰ") == normalize("J\u030c") == "\u01f0"
    assert normalize("?!  ..") == ""


def test_shingles_are_padded_so_short_strings_get_them():
    assert shingles("a") == {"  a", " a ", "a  "}
    assert shingles("Ab") == {"  a", " ab", "ab ", "b  "}
    assert shingles("ab", n=1) == {"a", "b"}
    assert shingles("") == shingles(" ,. ") == frozenset()
    with pytest.raises(ValueError, match="n must be >= 1"):
        shingles("a", n=0)


def test_exact_jaccard_by_hand():
    assert ngram_jaccard("Jacob Lanyon", "jacob, LANYON") == 1.0
    assert ngram_jaccard("abc", "xyz") == 0.0
    # "  jacob lanyon  " has 14 distinct 3-grams; the last letter's typo replaces the 3 that
    # hold it ("yon", "on ", "n  "): 11 shared out of 14 + 3.
    assert ngram_jaccard("jacob lanyon", "jacob lanyom") == pytest.approx(11 / 17)
    assert ngram_jaccard("", "") == 1.0 and ngram_jaccard("", "a") == 0.0


def _minhash_by_definition(text: str, num_perm: int, seed: int) -> list[int]:
    """min over shingles x of (a_k x + b_k) mod p, with Python integers, a_k and b_k from
    BLAKE2b of "minhash:<seed>:<k>", x = 64-bit little-endian BLAKE2b of the shingle mod p."""
    p = (1 << 31) - 1
    xs = [int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") % p
          for g in shingles(text)]
    out = []
    for k in range(num_perm):
        word = hashlib.blake2b(f"minhash:{seed}:{k}".encode(), digest_size=16).digest()
        a = int.from_bytes(word[:8], "little") % (p - 1) + 1
        b = int.from_bytes(word[8:], "little") % p
        out.append(min((a * x + b) % p for x in xs))
    return out


def test_signatures_match_the_definition_and_store_as_uint32():
    sig_NP = minhash_NP(TEXTS, num_perm=16, seed=3)
    assert sig_NP.shape == (len(TEXTS), 16) and sig_NP.dtype == np.uint32
    for text, row in zip(TEXTS[:-1], sig_NP[:-1], strict=True):
        assert row.tolist() == _minhash_by_definition(text, 16, 3)
    assert (sig_NP[-1] == EMPTY_SLOT).all() and (sig_NP[:-1] < PRIME).all()
    a_P, b_P = slot_params_P(16, seed=3)
    assert ((a_P >= 1) & (a_P < PRIME)).all() and ((b_P >= 0) & (b_P < PRIME)).all()


def test_chunking_does_not_change_signatures(monkeypatch):
    texts = [f"record {i} " + "abcdefgh"[: i % 8] * (i % 5) for i in range(60)] + [""] * 3
    whole = minhash_NP(texts, num_perm=32)
    monkeypatch.setattr(lexical, "_CHUNK_SHINGLES", 7)  # many chunks, texts split unevenly
    assert np.array_equal(minhash_NP(texts, num_perm=32), whole)
    assert minhash_NP([], num_perm=8).shape == (0, 8)


def test_estimate_identical_disjoint_typo_and_empty():
    sig_NP = minhash_NP(TEXTS, num_perm=128)
    j_NN = jaccard_estimate(sig_NP, sig_NP)
    assert j_NN.dtype == np.float32 and j_NN.shape == (6, 6)
    assert np.diag(j_NN).tolist() == [1.0] * 6  # the empty text matches itself
    assert j_NN[2, 3] < 0.05 and j_NN[4, 5] == 0.0  # unrelated; one char vs empty
    assert j_NN[0, 1] > 0.5  # two typos in a 33-character record
    assert np.array_equal(j_NN, j_NN.T)


def test_estimate_tracks_exact_jaccard_at_256_slots():
    base = "the quick brown fox jumps over the lazy dog near the river bank"
    others = [base.replace("quick", "quack"), base.replace("lazy dog", "sleepy cat"),
              base[:30], base + " at dawn with friends", "the river bank of the brown fox",
              "completely different words entirely", base.upper()]
    sig_NP = minhash_NP([base, *others], num_perm=256)
    est = jaccard_estimate(sig_NP[:1], sig_NP[1:])[0]
    exact = np.array([ngram_jaccard(base, o) for o in others])
    assert exact.min() < 0.1 and exact.max() == 1.0  # the cases span the range
    # The estimate's standard deviation is sqrt(J(1-J)/P) <= 0.031 at P=256.
    assert np.abs(est - exact).max() <= 0.1
    assert np.abs(est - exact).mean() <= 0.04


def test_rows_are_the_diagonal_and_shapes_are_checked():
    sig_a = minhash_NP(TEXTS[:3], num_perm=64)
    sig_b = minhash_NP(TEXTS[1:4], num_perm=64)
    assert np.array_equal(jaccard_rows(sig_a, sig_b), np.diag(jaccard_estimate(sig_a, sig_b)))
    with pytest.raises(InputShapeError, match="sig_b_MP"):
        jaccard_estimate(sig_a, minhash_NP(TEXTS[:3], num_perm=32))
    with pytest.raises(InputShapeError, match="sig_b_KP"):
        jaccard_rows(sig_a, sig_b[:2])


def test_deterministic_across_calls_seeds_and_hash_seeds():
    first = minhash_NP(TEXTS, num_perm=32)
    assert np.array_equal(first, minhash_NP(TEXTS, num_perm=32))
    assert not np.array_equal(first[:-1], minhash_NP(TEXTS, num_perm=32, seed=1)[:-1])
    code = ("import json, sys; from pipeline.lexical import minhash_NP; "
            "print(json.dumps(minhash_NP(json.loads(sys.argv[1]), num_perm=32).tolist()))")
    for hash_seed in ("1", "987654"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code, json.dumps(TEXTS)], env=env,
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert json.loads(out) == first.tolist()


def test_hybrid_keeps_cosine_merges_and_adds_lexical_ones():
    t = HybridThresholds(cos=0.88, lex=0.375, cos_floor=0.5)
    cos = np.array([0.95, 0.60, 0.40, 0.70, 0.60, 0.60], dtype=np.float32)
    lex = np.array([0.05, 0.75, 0.90, 0.20, 0.375, 0.50], dtype=np.float32)
    s = hybrid_similarity(cos, lex, t)
    assert s.dtype == np.float64
    assert s[0] == pytest.approx(0.95)  # a paraphrase: high cosine, no shared n-grams
    assert s[1] >= t.cos  # a typo'd record: lexical road, above the cosine floor
    assert s[2] == pytest.approx(0.40)  # lexically close but semantically far: kept apart
    assert s[3] == pytest.approx(0.70)  # neither road: the cosine, unchanged (SIMILAR_TO)
    assert s[4] >= t.cos  # exactly at the lexical threshold still merges
    # lex in [t.lex, 1] maps linearly onto [t.cos, 1]: 0.5 -> 0.88 + 0.125 * 0.12 / 0.625.
    assert s[5] == pytest.approx(0.88 + 0.125 * 0.12 / 0.625)
    assert s[1] > s[5]  # more lexical agreement, a better leader
    grid = hybrid_similarity(cos[:, None], lex[None, :], t)
    assert grid.shape == (6, 6) and (grid >= cos[:, None] - 1e-7).all()


@pytest.mark.parametrize(("kwargs", "field"), [({"cos": 1.5}, "cos"), ({"lex": 0.0}, "lex"),
                                               ({"lex": 1.0}, "lex"),
                                               ({"cos": 0.8, "cos_floor": 0.9}, "cos_floor")])
def test_thresholds_are_validated_by_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}=") as err:
        HybridThresholds(**kwargs)
    assert err.value.field == field
