"""llama2.c files: model checkpoints (``stories15M.bin`` and kin) and ``tokenizer.bin``.

Checkpoint (llama2.c's original export, version 0): seven int32 — dim, hidden_dim, n_layers,
n_heads, n_kv_heads, vocab_size (negative when the output matrix is stored separately rather
than shared with the embedding), max_seq_len — then float32 arrays, each ``nn.Linear``-style
``(out, in)``: token embedding ``(V, dim)``; per layer, in blocks of all layers: attention
norm, wq, wk, wv, wo, ffn norm, w1, w2, w3; the final norm; RoPE cos and sin tables
``(max_seq_len, head_dim / 2)`` (recomputed here, so skipped); the output matrix if unshared.

llama2.c rotates interleaved pairs (2i, 2i+1) of each head; Hugging Face's Llama rotates
halves (i, i + head_dim/2). `load_llama2c` permutes wq and wk rows accordingly, as Meta's
checkpoints are converted for Hugging Face.

Tokenizer: uint32 max_token_length, then per token float32 score, uint32 byte length, bytes.
Encoding is llama2.c's: a leading space (SentencePiece's dummy prefix), one token per UTF-8
character (bytes ``<0xXX>`` at ids 3 + byte when the character is unknown), then greedy merges
of the adjacent pair whose concatenation has the highest score.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import torch
from torch import Tensor

from pipeline.errors import PipelineError
from pipeline.moe import budget
from pipeline.moe.offline import force_offline

HEADER = struct.Struct("<7i")
# llama2.c's own tokenizers hold pieces of at most 27 bytes (32000 tokens) or fewer; a
# larger header value means the file is something else.
MAX_TOKEN_BYTES = 1024
BOS, EOS = 1, 2
# llama2.c's later export versions (export.py --version 1 or 2, and forks' own) begin with
# uint32 0x616b3432 ("ak42" in ASCII), then the version.
EXPORT_MAGIC = struct.pack("<I", 0x616B3432)
# 32000 pieces make 0.4 MB; a 128k vocabulary about 2 MB.
MAX_TOKENIZER_BYTES = 64 << 20
BYTE_PIECE = re.compile(rb"<0x[0-9A-Fa-f]{2}>")


class Llama2cError(PipelineError):
    """A llama2.c file that cannot be read; names the file and what is wrong."""

    def __init__(self, path: Path, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


def rope_permute(w: Tensor, n_heads: int) -> Tensor:
    """Reorder q/k projection rows from interleaved-pair to half-split rotary layout."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def rope_unpermute(w: Tensor, n_heads: int) -> Tensor:
    """The inverse of `rope_permute` (Hugging Face layout back to llama2.c's)."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def read_header(path: Path, data: bytes) -> dict[str, int]:
    if len(data) < HEADER.size:
        raise Llama2cError(path, f"truncated: {len(data)} bytes, shorter than the "
                           f"{HEADER.size}-byte header")
    if data[:4] == EXPORT_MAGIC:
        (version,) = struct.unpack_from("<i", data, 4)
        raise Llama2cError(path, f"llama2.c's export format version {version}: this reader "
                           "takes the original one (version 0, as stories*.bin are; "
                           "llama2.c's export.py --version 0 writes it)")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = HEADER.unpack_from(data)
    shared = vocab > 0
    vocab = abs(vocab)
    fields = dict(dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads,
                  n_kv_heads=kv_heads, vocab_size=vocab, max_seq_len=seq_len)
    bad = [k for k, v in fields.items() if not 0 < v < 1 << 20]
    if bad or dim % heads or heads % kv_heads or (dim // heads) % 2:
        raise Llama2cError(path, f"corrupted header {fields} (is this a llama2.c checkpoint?)")
    return {**fields, "shared_classifier": int(shared)}


def _sizes(h: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    L, D, F, V = h["n_layers"], h["dim"], h["hidden_dim"], h["vocab_size"]
    kv = D // h["n_heads"] * h["n_kv_heads"]
    half = D // h["n_heads"] // 2
    parts = [("embed", (V, D)), ("attn_norm", (L, D)), ("wq", (L, D, D)), ("wk", (L, kv, D)),
             ("wv", (L, kv, D)), ("wo", (L, D, D)), ("ffn_norm", (L, D)), ("w1", (L, F, D)),
             ("w2", (L, D, F)), ("w3", (L, F, D)), ("norm", (D,)),
             ("rope_cos", (h["max_seq_len"], half)), ("rope_sin", (h["max_seq_len"], half))]
    if not h["shared_classifier"]:
        parts.append(("output", (V, D)))
    return parts


def read_tensors(path: str | Path, max_params: int = budget.DEFAULT_MAX_PARAMS,
                 ) -> tuple[dict[str, int], dict[str, Tensor]]:
    """Header and named float32 tensors of a llama2.c checkpoint, checked for size (and
    refused over ``max_params`` parameters before a weight is read)."""
    path = Path(path)
    try:
        # The header and the file's size are checked before the weights are read, so that a
        # wrong file of gigabytes (a PyTorch or GGUF checkpoint) is refused without reading it.
        with path.open("rb") as f:
            header = read_header(path, f.read(HEADER.size))
            parts = _sizes(header)
            count = sum(torch.Size(s).numel() for _, s in parts)
            # The file is read once and copied into the model: twice its size in memory.
            budget.check_parameters(path, count, max_params, bytes_per_param=8)
            expected = HEADER.size + 4 * count
            size = path.stat().st_size
            if size != expected:
                what = "truncated" if size < expected else "has trailing bytes"
                raise Llama2cError(path, f"{what}: {size} bytes where the header "
                                   f"{header} implies {expected}")
            data = bytearray(f.read())
    except OSError as err:
        raise Llama2cError(path, f"cannot read: {err.strerror}") from err
    flat = torch.frombuffer(data, dtype=torch.float32)
    tensors, offset = {}, 0
    for name, shape in parts:
        n = torch.Size(shape).numel()
        tensors[name] = flat[offset: offset + n].view(shape).clone()
        offset += n
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise Llama2cError(path, "corrupted: weights hold NaN or infinity")
    return header, tensors


def load_llama2c(path: str | Path):
    """A Hugging Face ``LlamaForCausalLM`` holding a llama2.c checkpoint's weights."""
    return build_llama(*read_tensors(path))


def build_llama(h: dict[str, int], t: dict[str, Tensor]):
    """The ``LlamaForCausalLM`` of `read_tensors`' header and tensors.

    Apart from `load_llama2c` so that a caller can check the header (the vocabulary against
    its tokenizer) before paying for importing transformers.
    """
    force_offline()
    from transformers import LlamaConfig, LlamaForCausalLM

    # RoPE's theta is left at transformers' default, 10000, which is llama2.c's.
    config = LlamaConfig(
        vocab_size=h["vocab_size"], hidden_size=h["dim"], intermediate_size=h["hidden_dim"],
        num_hidden_layers=h["n_layers"], num_attention_heads=h["n_heads"],
        num_key_value_heads=h["n_kv_heads"], max_position_embeddings=h["max_seq_len"],
        rms_norm_eps=1e-5, tie_word_embeddings=bool(h["shared_classifier"]),
        bos_token_id=BOS, eos_token_id=EOS)
    model = LlamaForCausalLM(config)
    state = {"model.embed_tokens.weight": t["embed"], "model.norm.weight": t["norm"],
             "lm_head.weight": t.get("output", t["embed"])}
    for i in range(h["n_layers"]):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": t["attn_norm"][i],
            p + "self_attn.q_proj.weight": rope_permute(t["wq"][i], h["n_heads"]),
            p + "self_attn.k_proj.weight": rope_permute(t["wk"][i], h["n_kv_heads"]),
            p + "self_attn.v_proj.weight": t["wv"][i],
            p + "self_attn.o_proj.weight": t["wo"][i],
            p + "post_attention_layernorm.weight": t["ffn_norm"][i],
            p + "mlp.gate_proj.weight": t["w1"][i],
            p + "mlp.down_proj.weight": t["w2"][i],
            p + "mlp.up_proj.weight": t["w3"][i],
        }
    model.load_state_dict(state, strict=True)
    return model.eval()


def write_llama2c(model, path: str | Path) -> Path:
    """Write a Hugging Face Llama in llama2.c's format (the inverse of `load_llama2c`)."""
    c, sd = model.config, model.state_dict()
    L, D = c.num_hidden_layers, c.hidden_size
    half = D // c.num_attention_heads // 2
    shared = bool(c.tie_word_embeddings)
    header = HEADER.pack(D, c.intermediate_size, L, c.num_attention_heads,
                         c.num_key_value_heads, c.vocab_size if shared else -c.vocab_size,
                         c.max_position_embeddings)

    def layers(name: str, fix=lambda w: w) -> list[Tensor]:
        return [fix(sd[f"model.layers.{i}.{name}"]) for i in range(L)]

    freqs = 1.0 / 10000.0 ** (torch.arange(0, half).float() * 2 / (2 * half))
    angles = torch.outer(torch.arange(c.max_position_embeddings).float(), freqs)
    parts = [sd["model.embed_tokens.weight"], *layers("input_layernorm.weight"),
             *layers("self_attn.q_proj.weight",
                     lambda w: rope_unpermute(w, c.num_attention_heads)),
             *layers("self_attn.k_proj.weight",
                     lambda w: rope_unpermute(w, c.num_key_value_heads)),
             *layers("self_attn.v_proj.weight"), *layers("self_attn.o_proj.weight"),
             *layers("post_attention_layernorm.weight"), *layers("mlp.gate_proj.weight"),
             *layers("mlp.down_proj.weight"), *layers("mlp.up_proj.weight"),
             sd["model.norm.weight"], angles.cos(), angles.sin()]
    if not shared:
        parts.append(sd["lm_head.weight"])
    path = Path(path)
    with path.open("wb") as f:
        f.write(header)
        for p in parts:
            f.write(p.detach().float().contiguous().numpy().tobytes())
    return path


def _read_vocabulary(path: Path, data: bytes) -> tuple[int, list[bytes], list[float]]:
    """Maximum token length, pieces and scores of a ``tokenizer.bin``'s bytes, each checked."""
    pieces: list[bytes] = []
    scores: list[float] = []
    offset = 4
    try:
        (max_len,) = struct.unpack_from("<I", data, 0)
        if not 0 < max_len <= MAX_TOKEN_BYTES:
            raise Llama2cError(path, "not a llama2.c tokenizer: its header gives a maximum "
                               f"token length of {max_len} bytes")
        while offset < len(data):
            score, n = struct.unpack_from("<fI", data, offset)
            if n > max_len or not math.isfinite(score):
                raise Llama2cError(path, f"not a llama2.c tokenizer: token {len(pieces)} (byte "
                                   f"{offset}) has {n} bytes and score {score}, where the "
                                   f"header allows {max_len} bytes")
            piece = data[offset + 8: offset + 8 + n]
            if len(piece) != n:
                raise struct.error("piece runs past the end")
            pieces.append(piece)
            scores.append(score)
            offset += 8 + n
    except struct.error as err:
        raise Llama2cError(path, f"truncated tokenizer at byte {offset}: {err}") from err
    return max_len, pieces, scores


class Llama2cTokenizer:
    """llama2.c's ``tokenizer.bin``: scored vocabulary, BPE merges by score."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        try:
            with path.open("rb") as f:
                data = f.read(MAX_TOKENIZER_BYTES + 1)
        except OSError as err:
            raise Llama2cError(path, f"cannot read: {err.strerror}") from err
        if len(data) > MAX_TOKENIZER_BYTES:
            raise Llama2cError(path, f"over {MAX_TOKENIZER_BYTES >> 20} MiB: not a llama2.c "
                               "tokenizer (a checkpoint given as --tokenizer?)")
        try:
            self.max_token_length, self.pieces, self.scores = _read_vocabulary(path, data)
        except Llama2cError:
            # Asked only after the binary reading failed: a real tokenizer.bin may begin with
            # the byte of "{" (a maximum token length of 123).
            if data.lstrip()[:1] in (b"{", b"["):
                raise Llama2cError(path, "a JSON file, not a llama2.c tokenizer.bin (a Hugging "
                                   "Face tokenizer.json belongs in a model directory)") from None
            raise
        self.path = path
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.bos_token_id, self.eos_token_id = BOS, EOS

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        tokens: list[int] = []
        if text:
            text = " " + text  # SentencePiece's dummy prefix
        for ch in text:
            raw = ch.encode("utf-8")
            if raw in self.ids:
                tokens.append(self.ids[raw])
            else:  # byte fallback: <0xXX> sits at 3 + byte
                tokens.extend(self._byte_id(b, ch) for b in raw)
        while True:
            best, best_score = -1, float("-inf")
            for i in range(len(tokens) - 1):
                merged = self.ids.get(self.pieces[tokens[i]] + self.pieces[tokens[i + 1]])
                if merged is not None and self.scores[merged] > best_score:
                    best, best_score = i, self.scores[merged]
            if best < 0:
                break
            pair = self.pieces[tokens[best]] + self.pieces[tokens[best + 1]]
            tokens[best: best + 2] = [self.ids[pair]]
        return ([BOS] if bos else []) + tokens + ([EOS] if eos else [])

    def _byte_id(self, b: int, ch: str) -> int:
        """The id of byte ``b``'s piece, ``3 + b`` as llama2.c's run.c assumes: checked, since
        a vocabulary without it there would hand the model an id it has no embedding for."""
        i = 3 + b
        if i >= len(self.pieces) or self.pieces[i] != f"<0x{b:02X}>".encode():
            held = repr(self.pieces[i][:20]) if i < len(self.pieces) else "nothing"
            raise Llama2cError(self.path, f"token {i}: the text's {ch!r} needs the byte piece "
                               f"<0x{b:02X}> there (llama2.c's byte fallback), the file holds "
                               f"{held}")
        return i

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; BOS and EOS are never printed (the flag mirrors HF's API)."""
        out = bytearray()
        prev = BOS
        for i in ids:
            if i in (BOS, EOS):
                prev = i
                continue
            piece = self.pieces[i]
            if BYTE_PIECE.fullmatch(piece):
                piece = bytes([int(piece[3:5], 16)])
            elif prev == BOS and piece.startswith(b" "):
                piece = piece[1:]
            out += piece
            prev = i
        return out.decode("utf-8", errors="replace")


def write_tokenizer(pieces: list[bytes], scores: list[float], path: str | Path) -> Path:
    """Write a ``tokenizer.bin`` (for tests and for exporting a vocabulary)."""
    path = Path(path)
    with path.open("wb") as f:
        f.write(struct.pack("<I", max(len(p) for p in pieces)))
        for piece, score in zip(pieces, scores, strict=True):
            f.write(struct.pack("<fI", score, len(piece)) + piece)
    return path
