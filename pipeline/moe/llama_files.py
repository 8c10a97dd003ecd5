"""A Llama and its tokenizer from local files, every missing or wrong file one clear error.

`load_llama` takes what a user names on the command line:

* a **llama2.c checkpoint** (a file: ``stories15M.bin``) with its ``tokenizer.bin``
  (`llama2c.read_tensors` and `llama2c.Llama2cTokenizer` check each file's structure); the
  tokenizer must hold exactly the checkpoint's vocabulary, as llama2.c's ``run.c`` assumes;
* a **Hugging Face directory** (a ``LlamaForCausalLM`` written by ``save_pretrained``):
  ``config.json`` naming ``model_type: "llama"``, the weights (``model.safetensors``,
  ``pytorch_model.bin`` or their sharded indexes) and a tokenizer (``tokenizer.json`` or
  ``tokenizer.model``) there or in the directory given as the tokenizer.

Every check that needs only the file system runs before transformers is imported or a weight
is read: a mistake costs a fraction of a second, and a directory without ``config.json``
never reaches ``from_pretrained`` (which would build the default 7B-parameter Llama config
and run out of memory). What transformers itself refuses while loading is re-raised as
`ModelFileError` with its message on one line. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.errors import PipelineError
from pipeline.moe.llama2c import Llama2cTokenizer, build_llama, read_tensors

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class ModelFileError(PipelineError):
    """A model or tokenizer path that is missing or holds the wrong thing.

    Attributes:
        path: the file or directory, as the user gave it (or the file inside it at fault).
    """

    def __init__(self, path: Path, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


def load_llama(model_path: str | Path,
               tokenizer_path: str | Path | None = None) -> tuple[nn.Module, Any]:
    """``(LlamaForCausalLM in eval, tokenizer)`` from a llama2.c file or an HF directory.

    The tokenizer has ``encode(text) -> ids`` (with BOS) and ``decode(ids) -> text``: a
    `Llama2cTokenizer` or a Hugging Face tokenizer, as `llama.generate` takes.
    """
    path = _existing(model_path)
    tokenizer = None if tokenizer_path is None else _existing(tokenizer_path)
    if path.is_dir():
        return load_hf_llama(path, tokenizer)
    if path.suffix in (".safetensors", ".json"):
        raise ModelFileError(path, "a file of a Hugging Face model: give the directory that "
                             "holds it (config.json, the weights and the tokenizer)")
    return load_llama2c_pair(path, tokenizer)


def load_llama2c_pair(path: Path, tokenizer_path: Path | None) -> tuple[nn.Module, Any]:
    """A llama2.c checkpoint and its ``tokenizer.bin``, the vocabularies checked to agree."""
    if tokenizer_path is None:
        raise ModelFileError(path, "a llama2.c checkpoint needs --tokenizer tokenizer.bin "
                             "(llama2.c's tokenizer for this checkpoint)")
    if tokenizer_path.is_dir():
        raise ModelFileError(tokenizer_path, "a directory: a llama2.c checkpoint takes "
                             "llama2.c's tokenizer.bin file")
    tokenizer = Llama2cTokenizer(tokenizer_path)
    header, tensors = read_tensors(path)
    if tokenizer.vocab_size != header["vocab_size"]:
        raise ModelFileError(tokenizer_path, f"{tokenizer.vocab_size} tokens, where "
                             f"{path.name} has a vocabulary of {header['vocab_size']}: the "
                             "tokenizer of another model (stories260K pairs with tok512.bin)")
    return build_llama(header, tensors), tokenizer


def load_hf_llama(directory: Path, tokenizer_dir: Path | None = None) -> tuple[nn.Module, Any]:
    """A ``save_pretrained`` Llama directory and its tokenizer (there, or ``tokenizer_dir``)."""
    _check_config(directory)
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise ModelFileError(directory, "no weights: expected one of " + ", ".join(WEIGHT_FILES))
    tokenizer_dir = tokenizer_dir or directory
    if not tokenizer_dir.is_dir():
        raise ModelFileError(tokenizer_dir, "a file: a Hugging Face model takes a tokenizer "
                             "directory (with tokenizer.json or tokenizer.model)")
    if not any((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFileError(tokenizer_dir, "no tokenizer (tokenizer.json or tokenizer.model): "
                             "save it beside the model with tokenizer.save_pretrained, or give "
                             "its directory with --tokenizer")
    from safetensors import SafetensorError
    from transformers import AutoTokenizer, LlamaForCausalLM

    try:
        model, info = LlamaForCausalLM.from_pretrained(directory, local_files_only=True,
                                                       output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ModelFileError(directory, f"cannot load the weights: {_one_line(err)}") from err
    missing = sorted(map(str, [*info["missing_keys"], *info["mismatched_keys"]]))
    if missing:  # transformers would start these from random values and say so only in a log
        raise ModelFileError(directory, f"{len(missing)} weights missing or of the wrong shape "
                             f"(first: {missing[0]})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    # A tokenizer file transformers cannot parse raises anything from KeyError to the bare
    # Exception of the tokenizers library: all of them mean this directory's files are wrong.
    except Exception as err:
        raise ModelFileError(tokenizer_dir,
                             f"cannot load the tokenizer: {_one_line(err)}") from err
    return model.eval(), tokenizer


def _check_config(directory: Path) -> None:
    file = directory / "config.json"
    if not file.is_file():
        raise ModelFileError(directory, "no config.json: not a Hugging Face model directory "
                             "(save_pretrained writes one)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(file, f"cannot read as JSON: {err}") from err
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != "llama":
        raise ModelFileError(file, f"model_type {kind!r}: expected 'llama' (a "
                             "LlamaForCausalLM)")


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ModelFileError(path, "no such file or directory")
    return path


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
