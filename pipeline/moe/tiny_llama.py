"""A tiny Llama made here, to watch the conversion and the routing with nothing downloaded.

`tiny_llama` builds a Hugging Face ``LlamaForCausalLM`` of four small decoder layers whose
weights are transformers' own initialisation drawn from a fixed seed, so that every run (and
every machine) gets the same model; `CharTokenizer` gives it one token per printable ASCII
character. Nothing is trained: the text it generates is noise. The routing statistics are
real: the converted layers' gates route that model's hidden states exactly as they would a
trained model's, which is what the demo is for (``moe-pipeline generate --tiny``).

The sizes are the smallest that still show the mechanics: an MLP hidden size of 256 splits
evenly among 2, 4, 8 or 16 experts (``--init split``), grouped-query attention (4 heads, 2
key-value heads) exercises the same code paths as Llama 2/3, and 512 positions hold any
prompt and the default 64 new tokens. Conversion and 64 tokens take well under a second on
one CPU core.
"""

from __future__ import annotations

import torch

UNK, BOS, EOS = 0, 1, 2
SEED = 0  # fixed: the model is the same everywhere; --seed varies the sampling only
NOTICE = "a tiny random model made locally: the text is noise, the routing statistics are real"


class CharTokenizer:
    """Ids 0-2 are ``<unk>``, ``<s>``, ``</s>``; then newline and printable ASCII, one each.

    A character outside them encodes as ``<unk>`` and decodes as U+FFFD. Keeping the
    vocabulary printable means the noise the random model emits cannot move the terminal's
    cursor or change its colours (raw bytes would include escape sequences).
    """

    CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
    bos_token_id, eos_token_id = BOS, EOS

    def __init__(self) -> None:
        self.ids = {ch: 3 + i for i, ch in enumerate(self.CHARS)}

    @property
    def vocab_size(self) -> int:
        return 3 + len(self.CHARS)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([BOS] if bos else []) + [self.ids.get(ch, UNK) for ch in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; BOS and EOS are never printed (the flag mirrors HF's API)."""
        return "".join("\ufffd" if i == UNK else self.CHARS[i - 3]
                       for i in ids if i not in (BOS, EOS))


def tiny_llama(num_layers: int = 4):
    """A ``LlamaForCausalLM`` of ``num_layers`` layers (dim 64) for `CharTokenizer`, in eval.

    The global RNG is left as it was: the weights come from a forked one seeded with `SEED`.
    """
    from pipeline.moe.offline import force_offline

    force_offline()
    from transformers import LlamaConfig, LlamaForCausalLM

    # RoPE's theta is left at transformers' default, 10000.
    config = LlamaConfig(
        vocab_size=CharTokenizer().vocab_size, hidden_size=64, intermediate_size=256,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    return model.eval()


def describe(model) -> str:
    """One line for the user: what the tiny model is, and that its text is noise."""
    c = model.config
    return (f"--tiny: {NOTICE} ({c.num_hidden_layers} layers, dim {c.hidden_size}, "
            f"{c.vocab_size}-token character vocabulary, seed {SEED})")
