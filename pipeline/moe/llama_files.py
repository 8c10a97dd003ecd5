"""A Llama and its tokenizer from local files, every missing or wrong file one clear error.

`load_llama` takes what a user names on the command line:

* a **llama2.c checkpoint** (a file: ``stories15M.bin``) with its ``tokenizer.bin``
  (`llama2c.read_tensors` and `llama2c.Llama2cTokenizer` check each file's structure); the
  tokenizer must hold exactly the checkpoint's vocabulary, as llama2.c's ``run.c`` assumes;
* a **Hugging Face directory** (a ``LlamaForCausalLM`` written by ``save_pretrained``):
  ``config.json`` naming ``model_type: "llama"``, the weights as safetensors
  (``model.safetensors`` or its sharded index; ``pytorch_model.bin`` is a pickle, and
  unpickling runs whatever code the file names, so it is refused) and a tokenizer
  (``tokenizer.json`` or ``tokenizer.model``) there or in the directory given as the
  tokenizer.

Every check that needs only the file system runs before transformers is imported or a weight
is read: a mistake costs a fraction of a second, and a directory without ``config.json``
never reaches ``from_pretrained`` (which would build the default 7B-parameter Llama config
and run out of memory). What transformers itself refuses while loading is re-raised as
`ModelFileError` with its message on one line. Nothing is ever downloaded: the Hub is
switched offline first, and a config asking for anything but local files (a Hub kernel, remote
code, a quantiser) is refused (`offline`). The config's sizes are counted before the model
is built and refused over ``max_params`` (`budget`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from torch import nn

from pipeline.errors import PipelineError
from pipeline.moe import budget
from pipeline.moe.checkpoint import JsonFileError, read_json
from pipeline.moe.llama2c import Llama2cTokenizer, build_llama, read_tensors
from pipeline.moe.offline import check_local_config, force_offline

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
MAX_CONFIG_BYTES = 1 << 20  # a Llama config.json is about 1 KB
# Each size field of a Llama config: its ceiling (far above Llama 3.1 405B's 126 layers,
# width 16384, MLP 53248, 128 heads, a 128k vocabulary) and transformers' default.
SIZE_FIELDS = {"vocab_size": (1 << 22, 32000), "hidden_size": (1 << 20, 4096),
               "intermediate_size": (1 << 20, 11008), "num_hidden_layers": (1024, 32),
               "num_attention_heads": (1 << 14, 32)}


class ModelFileError(PipelineError):
    """A model or tokenizer path that is missing or holds the wrong thing.

    Attributes:
        path: the file or directory, as the user gave it (or the file inside it at fault).
    """

    def __init__(self, path: Path, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


def load_llama(model_path: str | Path, tokenizer_path: str | Path | None = None,
               max_params: int = budget.DEFAULT_MAX_PARAMS) -> tuple[nn.Module, Any]:
    """``(LlamaForCausalLM in eval, tokenizer)`` from a llama2.c file or an HF directory.

    The tokenizer has ``encode(text) -> ids`` (with BOS) and ``decode(ids) -> text``: a
    `Llama2cTokenizer` or a Hugging Face tokenizer, as `llama.generate` takes. A model of
    more than ``max_params`` parameters is refused before it is built.
    """
    path = _existing(model_path)
    tokenizer = None if tokenizer_path is None else _existing(tokenizer_path)
    if path.is_dir():
        return load_hf_llama(path, tokenizer, max_params)
    if path.suffix in (".safetensors", ".json"):
        raise ModelFileError(path, "a file of a Hugging Face model: give the directory that "
                             "holds it (config.json, the weights and the tokenizer)")
    return load_llama2c_pair(path, tokenizer, max_params)


def load_llama2c_pair(path: Path, tokenizer_path: Path | None,
                      max_params: int = budget.DEFAULT_MAX_PARAMS) -> tuple[nn.Module, Any]:
    """A llama2.c checkpoint and its ``tokenizer.bin``, the vocabularies checked to agree."""
    if tokenizer_path is None:
        raise ModelFileError(path, "a llama2.c checkpoint needs --tokenizer tokenizer.bin "
                             "(llama2.c's tokenizer for this checkpoint)")
    if tokenizer_path.is_dir():
        raise ModelFileError(tokenizer_path, "a directory: a llama2.c checkpoint takes "
                             "llama2.c's tokenizer.bin file")
    tokenizer = Llama2cTokenizer(tokenizer_path)
    header, tensors = read_tensors(path, max_params)
    if tokenizer.vocab_size != header["vocab_size"]:
        raise ModelFileError(tokenizer_path, f"{tokenizer.vocab_size} tokens, where "
                             f"{path.name} has a vocabulary of {header['vocab_size']}: the "
                             "tokenizer of another model (stories260K pairs with tok512.bin)")
    return build_llama(header, tensors), tokenizer


def load_hf_llama(directory: Path, tokenizer_dir: Path | None = None,
                  max_params: int = budget.DEFAULT_MAX_PARAMS) -> tuple[nn.Module, Any]:
    """A ``save_pretrained`` Llama directory and its tokenizer (there, or ``tokenizer_dir``)."""
    config = _check_config(directory, max_params)
    _check_weights(directory)
    tokenizer_dir = tokenizer_dir or directory
    if not tokenizer_dir.is_dir():
        raise ModelFileError(tokenizer_dir, "a file: a Hugging Face model takes a tokenizer "
                             "directory (with tokenizer.json or tokenizer.model)")
    if not any((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFileError(tokenizer_dir, "no tokenizer (tokenizer.json or tokenizer.model): "
                             "save it beside the model with tokenizer.save_pretrained, or give "
                             "its directory with --tokenizer")
    force_offline()
    from safetensors import SafetensorError
    from transformers import AutoTokenizer, LlamaForCausalLM

    attention = config.get("attn_implementation") or config.get("_attn_implementation")
    try:
        loaded = LlamaForCausalLM.from_pretrained(
            directory, local_files_only=True, output_loading_info=True, use_safetensors=True,
            trust_remote_code=False, attn_implementation=attention or "sdpa")
        # With output_loading_info, a (model, info) pair: transformers' annotation omits it.
        model, info = cast(tuple[LlamaForCausalLM, dict[str, Any]], loaded)
    except (OSError, ValueError, RuntimeError, ImportError, SafetensorError) as err:
        raise ModelFileError(directory, f"cannot load the weights: {_one_line(err)}") from err
    missing = sorted(map(str, [*info["missing_keys"], *info["mismatched_keys"]]))
    if missing:  # transformers would start these from random values and say so only in a log
        raise ModelFileError(directory, f"{len(missing)} weights missing or of the wrong shape "
                             f"(first: {missing[0]})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True,
                                                  trust_remote_code=False)
    # A tokenizer file transformers cannot parse raises anything from KeyError to the bare
    # Exception of the tokenizers library: all of them mean this directory's files are wrong.
    except Exception as err:
        raise ModelFileError(tokenizer_dir,
                             f"cannot load the tokenizer: {_one_line(err)}") from err
    return model.eval(), tokenizer


def _check_weights(directory: Path) -> None:
    if any((directory / name).is_file() for name in WEIGHT_FILES):
        return
    pickled = [name for name in PICKLE_FILES if (directory / name).is_file()]
    if pickled:
        raise ModelFileError(directory / pickled[0], "PyTorch pickle weights: unpickling runs "
                             "whatever code the file names, so only safetensors are read "
                             "(convert with save_pretrained(..., safe_serialization=True))")
    raise ModelFileError(directory, "no weights: expected one of " + ", ".join(WEIGHT_FILES))


def _check_config(directory: Path, max_params: int) -> dict[str, Any]:
    """The parsed config.json, refused in one line naming the field when it is not a
    local Llama of at most ``max_params`` parameters."""
    file = directory / "config.json"
    if not file.is_file():
        raise ModelFileError(directory, "no config.json: not a Hugging Face model directory "
                             "(save_pretrained writes one)")
    try:
        config = read_json(file, MAX_CONFIG_BYTES, "a model config")
    except JsonFileError as err:
        raise ModelFileError(file, err.reason) from err
    if not isinstance(config, dict):
        raise ModelFileError(file, f"a JSON {type(config).__name__}, not a config object")
    kind = config.get("model_type")
    if kind != "llama":
        raise ModelFileError(file, f"model_type {str(kind)[:60]!r}: expected 'llama' (a "
                             "LlamaForCausalLM)")
    check_local_config(file, config)
    _check_size(file, config, max_params)
    return config


def _size(file: Path, config: dict[str, Any], field: str, limit: int, default: int) -> int:
    value = config.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise ModelFileError(file, f"{field}: {str(value)[:60]} is not an integer in "
                             f"[1, {limit:,}]")
    return value


def _check_size(file: Path, config: dict[str, Any], max_params: int) -> None:
    """Count the parameters the config describes (`budget.llama_parameters`), refuse over
    ``max_params``."""
    v, d, f, layers, heads = (_size(file, config, name, *spec)
                              for name, spec in SIZE_FIELDS.items())
    kv = _size(file, config, "num_key_value_heads", heads, heads)
    head_dim = _size(file, config, "head_dim", 1 << 14, d // heads or 1)
    if heads % kv:
        raise ModelFileError(file, f"num_key_value_heads: {kv} does not divide "
                             f"num_attention_heads {heads}")
    tied = config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ModelFileError(file, f"tie_word_embeddings: {str(tied)[:60]} is not true/false")
    dtype = config.get("dtype") or config.get("torch_dtype")
    count = budget.llama_parameters(v, d, f, layers, heads, kv, head_dim, tied)
    budget.check_parameters(file, count, max_params, budget.DTYPE_BYTES.get(str(dtype), 4))


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ModelFileError(path, "no such file or directory")
    return path


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
