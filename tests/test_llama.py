"""Dense → MoE conversion of tiny Llama models made here, llama2.c files, and generation."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the llama extra (transformers) is not installed")
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline import ConfigError
from pipeline.moe.llama import (
    MoEMLP,
    convert_to_moe,
    count_active_parameters,
    count_parameters,
    generate,
    generate_batch,
    kv_cache,
    moe_mlps,
)
from pipeline.moe.llama2c import (
    Llama2cError,
    Llama2cTokenizer,
    load_llama2c,
    read_tensors,
    write_llama2c,
    write_tokenizer,
)
from pipeline.moe.llama_files import ModelFileError, load_llama
from pipeline.moe.tiny_llama import NOTICE, CharTokenizer, tiny_llama

LETTERS = [c.encode() for c in " abcdefghijklmnopqrstuvwxyz.,"]
MERGES = [b" t", b"he", b" the", b"in", b" a", b"an", b"ing", b"on", b" on"]
PIECES = ([b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
          + LETTERS + MERGES)
VOCAB = len(PIECES)


def small_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random weights large enough that every layer matters
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 9))


@pytest.mark.parametrize(
    "gate",
    [dict(gate_type="topk"), dict(gate_type="noisy_topk"), dict(gate_type="hash"),
     dict(gate_type="random"), dict(gate_type="topk", num_shared_experts=0, top_k=4),
     dict(gate_type="expert_choice", capacity_factor=2.0)],
    ids=lambda g: "-".join(f"{v}" for v in g.values()),
)
def test_copy_init_keeps_the_dense_models_logits(gate, ids):
    dense = small_llama()
    kw = {"top_k": 2, **gate}
    moe = convert_to_moe(dense, [0, 1], num_experts=4, expert_init_strategy="copy", **kw)
    assert set(moe_mlps(moe)) == {0, 1}
    assert not any(isinstance(layer.mlp, MoEMLP) for layer in dense.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)


def test_perturb_and_random_init_change_the_model(ids):
    dense = small_llama()
    perturbed = convert_to_moe(dense, [1], num_experts=4, expert_init_noise=0.05)
    w1 = perturbed.model.layers[1].mlp.moe.experts.w1
    assert not torch.equal(w1[0], w1[1])
    with torch.no_grad():
        d, p = dense(ids).logits, perturbed(ids).logits
        assert 0 < (d - p).abs().max() < 0.5 * d.abs().max()
    rand = convert_to_moe(dense, [1], num_experts=4, expert_init_strategy="random")
    assert not torch.allclose(rand.model.layers[1].mlp.moe.experts.w1[0],
                              dense.model.layers[1].mlp.gate_proj.weight)


def test_split_init_keeps_the_parameter_count():
    dense = small_llama()
    moe = convert_to_moe(dense, [0, 1], num_experts=4, top_k=2, expert_init_strategy="split")
    routers = 2 * 4 * 32
    assert count_parameters(moe) == count_parameters(dense) + routers
    experts = moe.model.layers[0].mlp.moe.experts
    assert experts.w1.shape == (4, 16, 32)
    # Expert e holds hidden units e*16 .. e*16+15 of the dense MLP.
    torch.testing.assert_close(experts.w1[2], dense.model.layers[0].mlp.gate_proj.weight[32:48])
    torch.testing.assert_close(experts.w2[2],
                               dense.model.layers[0].mlp.down_proj.weight[:, 32:48])
    active = count_active_parameters(moe)
    assert active == count_parameters(moe) - 2 * (3 * 64 * 32) // 2


def test_conversion_refuses_bad_arguments():
    dense = small_llama()
    with pytest.raises(ConfigError, match="expert_init_strategy='clone'"):
        convert_to_moe(dense, [0], expert_init_strategy="clone")
    with pytest.raises(ConfigError, match="layers=\\[5\\]"):
        convert_to_moe(dense, [5])
    with pytest.raises(ConfigError, match="num_experts=3 .* divisor"):
        convert_to_moe(dense, [0], num_experts=3, expert_init_strategy="split")
    with pytest.raises(ConfigError, match="top_k_experts=9"):
        convert_to_moe(dense, [0], num_experts=4, top_k=9)


def _tokenizer(tmp_path) -> Llama2cTokenizer:
    scores = [0.0] * (len(PIECES) - len(MERGES)) + [float(-i) for i in range(len(MERGES))]
    return Llama2cTokenizer(write_tokenizer(PIECES, scores, tmp_path / "tokenizer.bin"))


def test_llama2c_tokenizer_merges_by_score_and_round_trips(tmp_path):
    tok = _tokenizer(tmp_path)
    ids = tok.encode("the cat")
    assert ids[0] == 1 and tok.pieces[ids[1]] == b" the"
    assert tok.decode(ids) == "the cat"
    odd = tok.encode("naïve!")  # ï and ! fall back to bytes
    assert tok.decode(odd) == "naïve!"
    assert tok.encode("") == [1]


def reference_llama2c_logits(path, tokens: list[int]) -> torch.Tensor:
    """llama2.c's run.c forward, written out: interleaved-pair RoPE, GQA, RMSNorm."""
    h, t = read_tensors(path)
    D, H, KV = h["dim"], h["n_heads"], h["n_kv_heads"]
    hs = D // H

    def rms(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def rope(v, pos):
        v = v.clone()
        for i in range(0, v.shape[0], 2):
            angle = pos / 10000.0 ** ((i % hs) / hs)
            c, s = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
            a, b = v[i].clone(), v[i + 1].clone()
            v[i], v[i + 1] = a * c - b * s, a * s + b * c
        return v

    x = t["embed"][tokens]
    T = len(tokens)
    for layer in range(h["n_layers"]):
        xb = rms(x, t["attn_norm"][layer])
        q = torch.stack([rope(xb[p] @ t["wq"][layer].T, p) for p in range(T)])
        k = torch.stack([rope(xb[p] @ t["wk"][layer].T, p) for p in range(T)])
        v = xb @ t["wv"][layer].T
        att = torch.zeros(T, D)
        for head in range(H):
            kvh = head // (H // KV)
            qh, kh = q[:, head * hs:(head + 1) * hs], k[:, kvh * hs:(kvh + 1) * hs]
            vh = v[:, kvh * hs:(kvh + 1) * hs]
            scores = (qh @ kh.T) / hs**0.5
            scores = scores.masked_fill(torch.triu(torch.ones(T, T), 1).bool(), float("-inf"))
            att[:, head * hs:(head + 1) * hs] = scores.softmax(-1) @ vh
        x = x + att @ t["wo"][layer].T
        xb = rms(x, t["ffn_norm"][layer])
        hb = torch.nn.functional.silu(xb @ t["w1"][layer].T) * (xb @ t["w3"][layer].T)
        x = x + hb @ t["w2"][layer].T
    x = rms(x, t["norm"])
    return x @ t.get("output", t["embed"]).T


@pytest.mark.parametrize("tie", [False, True])
def test_llama2c_checkpoint_loads_with_run_c_semantics(tmp_path, tie):
    hf = small_llama(tie=tie)
    path = write_llama2c(hf, tmp_path / "model.bin")
    loaded = load_llama2c(path)
    tokens = [1, 40, 290, 7, 12, 280]
    with torch.no_grad():
        ours = loaded(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(ours, reference_llama2c_logits(path, tokens), atol=1e-4,
                               rtol=1e-4)
    with torch.no_grad():  # and it is the model that was written
        torch.testing.assert_close(ours, hf(torch.tensor([tokens])).logits[0], atol=1e-4,
                                   rtol=1e-4)
    # A llama2.c model converts like any other.
    moe = convert_to_moe(loaded, [1], num_experts=2, top_k=1, expert_init_strategy="copy")
    with torch.no_grad():
        torch.testing.assert_close(moe(torch.tensor([tokens])).logits[0], ours, atol=1e-4,
                                   rtol=1e-4)


def test_bad_llama2c_files_give_clear_errors(tmp_path):
    path = write_llama2c(small_llama(), tmp_path / "model.bin")
    data = path.read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-100])
    with pytest.raises(Llama2cError, match="short.bin: truncated: .* implies"):
        load_llama2c(tmp_path / "short.bin")
    (tmp_path / "tiny.bin").write_bytes(data[:10])
    with pytest.raises(Llama2cError, match="shorter than the 28-byte header"):
        load_llama2c(tmp_path / "tiny.bin")
    (tmp_path / "bad.bin").write_bytes(struct.pack("<7i", 32, 64, 2, 5, 2, 9, 64) + data[28:])
    with pytest.raises(Llama2cError, match="corrupted header"):
        load_llama2c(tmp_path / "bad.bin")
    (tmp_path / "v2.bin").write_bytes(struct.pack("<Ii", 0x616B3432, 2) + data[28:])
    with pytest.raises(Llama2cError, match="v2.bin: llama2.c's export format version 2"):
        load_llama2c(tmp_path / "v2.bin")
    nan = bytearray(data)
    nan[40:44] = struct.pack("<f", float("nan"))
    (tmp_path / "nan.bin").write_bytes(bytes(nan))
    with pytest.raises(Llama2cError, match="NaN"):
        load_llama2c(tmp_path / "nan.bin")
    with pytest.raises(Llama2cError, match="cannot read"):
        load_llama2c(tmp_path / "absent.bin")
    tok = (tmp_path / "tok.bin")
    write_tokenizer(PIECES, [0.0] * VOCAB, tok)
    (tmp_path / "tok_short.bin").write_bytes(tok.read_bytes()[:-3])
    with pytest.raises(Llama2cError, match="truncated tokenizer"):
        Llama2cTokenizer(tmp_path / "tok_short.bin")


@pytest.mark.parametrize("gate", ["topk", "hash"])
def test_cached_decoding_matches_a_full_forward(gate, ids):
    moe = convert_to_moe(small_llama(), [0, 1], num_experts=4, top_k=2, gate_type=gate,
                         expert_init_noise=0.5)
    with torch.no_grad():
        cache = kv_cache(moe)
        moe(ids[:, :-1], use_cache=True, **cache)  # fills the cache in place
        step = moe(ids[:, -1:], use_cache=True, **cache)
        full = moe(ids)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-4, rtol=1e-4)


def test_generated_text_keeps_its_spaces(tmp_path):
    tok = _tokenizer(tmp_path)
    moe = convert_to_moe(small_llama(), [1], num_experts=2, top_k=1)
    result = generate(moe, tok, "the cat", temperature=0, max_new_tokens=6)
    prompt_ids = tok.encode("the cat")
    assert "the cat" + result.text == tok.decode(prompt_ids + result.token_ids)


def test_generation_reports_expert_usage_and_entropy(tmp_path, capsys):
    tok = _tokenizer(tmp_path)
    moe = convert_to_moe(small_llama(), [0, 1], num_experts=4, top_k=2)
    result = generate(moe, tok, "the cat", temperature=0.8, max_new_tokens=12, seed=3,
                      show_expert_stats=True, show_routing_entropy=True)
    assert 0 < len(result.token_ids) <= 12
    assert isinstance(result.text, str)
    assert set(result.expert_usage) == {0, 1}
    for layer in (0, 1):
        assert sum(result.expert_usage[layer]) == pytest.approx(100.0)
        assert 0 <= result.routing_entropy[layer] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    printed = capsys.readouterr().out
    assert "layer 0:" in printed and "entropy=" in printed
    again = generate(moe, tok, "the cat", temperature=0.8, max_new_tokens=12, seed=3)
    assert again.token_ids == result.token_ids  # seeded sampling is reproducible
    greedy = generate_batch(moe, tok, ["a", "the"], temperature=0, max_new_tokens=4,
                            show_progress=False)
    assert len(greedy) == 2 and all(len(r.token_ids) <= 4 for r in greedy)




def test_generation_uses_the_current_cache_api(tmp_path):
    moe = convert_to_moe(small_llama(), [0], num_experts=2, top_k=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        result = generate(moe, _tokenizer(tmp_path), "the", temperature=0, max_new_tokens=4)
    assert len(result.token_ids) == 4


def test_conversion_is_reproducible_from_its_seed(ids):
    a, b = (convert_to_moe(small_llama(), [0, 1], num_experts=4, seed=7) for _ in range(2))
    c = convert_to_moe(small_llama(), [0, 1], num_experts=4, seed=8)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    weight_a, weight_c = (next(m.model.layers[0].mlp.moe.gate.router.parameters())
                          for m in (a, c))
    assert not torch.equal(weight_a, weight_c)  # the seed reaches the routers


# -- the tiny local model -------------------------------------------------------------------

def test_the_tiny_model_is_fixed_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    one, two = tiny_llama(), tiny_llama()
    assert torch.rand(1) == before  # building it drew nothing from the caller's stream
    for p, q in zip(one.parameters(), two.parameters(), strict=True):
        assert torch.equal(p, q)
    tok = CharTokenizer()
    assert one.config.vocab_size == tok.vocab_size
    ids = tok.encode("Once upon a time,\nthe end.")
    assert ids[0] == 1 and max(ids) < tok.vocab_size
    assert tok.decode(ids) == "Once upon a time,\nthe end."
    assert tok.decode(tok.encode("naïve")) == "na\ufffdve"  # outside printable ASCII: <unk>


ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    """``moe-pipeline generate ARGS``, a FutureWarning (transformers' old cache API) fatal."""
    return subprocess.run([sys.executable, "-W", "error::FutureWarning", "-m", "pipeline.cli",
                           "generate", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.integration  # the CLI in a subprocess
def test_cli_generates_with_the_tiny_local_model():
    proc = cli("--tiny", "--max-new-tokens", "16", "--prompt", "Once")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert NOTICE in lines[0]
    assert lines[1].startswith("converted layers [0, 1, 2, 3] of 4:")
    stats = lines[2:6]
    assert [line.split(":")[0] for line in stats] == [f"layer {i}" for i in range(4)]
    for line in stats:  # usage sums to 100% less the experts under 1% left out, rounded
        percents = [int(p.split("=")[1].rstrip("%")) for p in line.split()[2:-1]]
        assert 90 <= sum(percents) <= 104 and line.split()[-1].startswith("entropy=")
    assert lines[6].startswith("Once")
    assert "FutureWarning" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.integration  # the CLI in a subprocess
def test_cli_converts_a_llama2c_checkpoint_and_generates(tmp_path):
    model = write_llama2c(small_llama(), tmp_path / "model.bin")
    _tokenizer(tmp_path)
    proc = cli(str(model), "--tokenizer", str(tmp_path / "tokenizer.bin"), "--layers", "1",
               "--experts", "4", "--max-new-tokens", "8", "--prompt", "the")
    assert proc.returncode == 0, proc.stderr
    assert "converted layers [1] of 2" in proc.stdout
    assert "layer 1:" in proc.stdout and "entropy=" in proc.stdout


def _hf_tokenizer():
    """A character-level Hugging Face tokenizer made here (ids below `small_llama`'s vocab)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = " abcdefghijklmnopqrstuvwxyz.,"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: 3 + i for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _bad_files(tmp_path: Path, case: str) -> tuple[list[str], Path]:
    """The command-line arguments of one wrong-file case, and the path the error must name."""
    model = write_llama2c(small_llama(), tmp_path / "model.bin")
    tokenizer = write_tokenizer(PIECES, [0.0] * VOCAB, tmp_path / "tokenizer.bin")
    hf = tmp_path / "hf"
    if case.startswith("hf"):
        small_llama().save_pretrained(hf)
    if case == "bin-without-tokenizer":
        return [str(model)], model
    if case == "json-tokenizer":
        tokenizer.write_text('{"version": "1.0", "model": {"type": "BPE"}}')
        return [str(model), "--tokenizer", str(tokenizer)], tokenizer
    if case == "truncated-bin":
        model.write_bytes(model.read_bytes()[:1000])
        return [str(model), "--tokenizer", str(tokenizer)], model
    if case == "garbage-bin":
        model.write_bytes(os.urandom(4096))
        return [str(model), "--tokenizer", str(tokenizer)], model
    if case == "missing-file":
        absent = tmp_path / "absent.bin"
        return [str(absent), "--tokenizer", str(tokenizer)], absent
    if case == "hf-without-config":
        (hf / "config.json").unlink()
    elif case == "hf-without-weights":
        (hf / "model.safetensors").unlink()
    elif case == "hf-with-a-tokenizer-file":
        _hf_tokenizer().save_pretrained(hf)
        return [str(hf), "--tokenizer", str(tokenizer)], tokenizer
    return [str(hf)], hf  # hf-without-tokenizer: save_pretrained of the model alone


@pytest.mark.integration  # the CLI in a subprocess
@pytest.mark.parametrize("case", [
    "bin-without-tokenizer", "json-tokenizer", "truncated-bin", "garbage-bin", "missing-file",
    "hf-without-config", "hf-without-weights", "hf-without-tokenizer",
    "hf-with-a-tokenizer-file"])
def test_cli_names_each_missing_or_wrong_file_in_one_line(tmp_path, case):
    args, culprit = _bad_files(tmp_path, case)
    proc = cli(*args)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {culprit}: "), proc.stderr


def test_load_llama_reads_a_hugging_face_directory(tmp_path):
    for tie in (False, True):
        dense = small_llama(tie=tie)
        dense.save_pretrained(tmp_path / f"tie{tie}")
        _hf_tokenizer().save_pretrained(tmp_path / f"tie{tie}")
        model, tok = load_llama(tmp_path / f"tie{tie}")
        ids = torch.tensor([tok.encode("the cat")])
        assert ids[0, 0] == 1
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, dense(ids).logits)
    _hf_tokenizer().save_pretrained(tmp_path / "tok")  # a tokenizer from elsewhere
    model, tok = load_llama(tmp_path / "tieFalse", tmp_path / "tok")
    result = generate(convert_to_moe(model, [0], num_experts=2), tok, "the", temperature=0,
                      max_new_tokens=3)
    assert len(result.token_ids) == 3


def test_load_llama_refuses_wrong_weights_and_tokenizers(tmp_path):
    import safetensors.torch

    hf = tmp_path / "hf"
    small_llama().save_pretrained(hf)
    _hf_tokenizer().save_pretrained(hf)
    weights = hf / "model.safetensors"
    state = safetensors.torch.load_file(weights)
    state.pop("model.layers.1.mlp.up_proj.weight")
    safetensors.torch.save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="1 weights missing .*model.layers.1.mlp.up_proj"):
        load_llama(hf)
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="hf: cannot load the weights: "):
        load_llama(hf)
    (hf / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ModelFileError, match="config.json: model_type 'gpt2'"):
        load_llama(hf)
    small_llama().save_pretrained(hf)  # sound weights and config again, a broken tokenizer
    (hf / "tokenizer.json").write_text("not json")
    with pytest.raises(ModelFileError, match="hf: cannot load the tokenizer: "):
        load_llama(hf)
    # A llama2.c tokenizer of another vocabulary than the checkpoint's.
    model = write_llama2c(small_llama(), tmp_path / "model.bin")
    other = write_tokenizer(PIECES[:100], [0.0] * 100, tmp_path / "tok512.bin")
    with pytest.raises(ModelFileError, match="tok512.bin: 100 tokens, where model.bin has a "
                                             f"vocabulary of {VOCAB}"):
        load_llama(model, other)


def test_llama2c_tokenizer_refuses_files_that_are_not_tokenizers(tmp_path):
    (tmp_path / "json.bin").write_text('{"model": {}}')
    with pytest.raises(Llama2cError, match="json.bin: a JSON file, not a llama2.c tokenizer"):
        Llama2cTokenizer(tmp_path / "json.bin")
    (tmp_path / "huge.bin").write_bytes(struct.pack("<I", 1 << 30) + bytes(64))
    with pytest.raises(Llama2cError, match="maximum token length of 1073741824"):
        Llama2cTokenizer(tmp_path / "huge.bin")
    (tmp_path / "long.bin").write_bytes(struct.pack("<IfI", 4, 0.0, 9) + b"x" * 9)
    with pytest.raises(Llama2cError, match="token 0 .* has 9 bytes"):
        Llama2cTokenizer(tmp_path / "long.bin")
    # A real tokenizer whose maximum length is 123, the byte of "{", is still read.
    pieces = [b"<unk>", b"<s>", b"</s>", b"x" * 123]
    tok = Llama2cTokenizer(write_tokenizer(pieces, [0.0] * 4, tmp_path / "t.bin"))
    assert tok.max_token_length == 123 and tok.vocab_size == 4
