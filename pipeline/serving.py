"""Which model is served: its config, its fingerprint, and the system built from it.

The served model is the checkpoint at ``MOE_MODEL_PATH``, else the newest one `moe-pipeline
train` wrote under ``<state dir>/models``, else the default model built from ``MOE_SEED``
with its supervisor started from the constellations' descriptions (the same weights in every
process, so a redelivered batch drafts the same reports wherever it runs). A fingerprint
names what makes two processes draft the same reports: the config, the weights and the text
encoder. Every job records the fingerprint it
was submitted for, and a GPU worker serving another refuses the batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from pipeline.encoders import EncoderUnavailable, description_prototypes
from pipeline.errors import PipelineError
from pipeline.moe import budget, checkpoint
from pipeline.moe.config import MoEConfig
from pipeline.moe.system import MixtureOfExpertsSystem
from pipeline.records import stable_id
from pipeline.settings import Settings

log = logging.getLogger(__name__)


# What a user would write for each default topic: general words, not phrases of any corpus.
DEFAULT_CONSTELLATIONS = {
    "mathematics": "numbers, equations, proofs, algebra, geometry, probability and calculus",
    "language": "words, grammar, sentences, speech, meaning and writing",
    "vision": "seeing, eyes, sight, images, light, colour and cameras",
    "memory": "remembering, forgetting, learning, recall and the past",
}


def default_config() -> MoEConfig:
    """The model the pipeline serves when no trained one is there: small enough for a laptop
    CPU, as wide as the bundled sentence encoder (all-MiniLM-L6-v2, 384), with four described
    constellations of two experts, one chosen per item."""
    return MoEConfig(input_dim=384, hidden_dim=384, output_dim=384, num_experts=8,
                     top_k_experts=2, num_layers=2, use_compile=False, use_amp=False,
                     constellations={name: {"experts": [2 * g, 2 * g + 1],
                                            "description": description}
                                     for g, (name, description)
                                     in enumerate(DEFAULT_CONSTELLATIONS.items())})


def models_dir(settings: Settings) -> Path:
    """Where `moe-pipeline train` writes checkpoints: ``<state dir>/models``."""
    return settings.state_dir / "models"


def checkpoint_dirs(settings: Settings) -> list[Path]:
    """Every directory of ``<state dir>/models`` holding a config.json, oldest first,
    usable or not."""
    root = models_dir(settings)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if (p / "config.json").is_file()]
    return sorted(found, key=lambda p: ((p / "config.json").stat().st_mtime, p.name))


def unusable(path: Path, settings: Settings) -> str | None:
    """Why the checkpoint at ``path`` cannot be served (its config unreadable, or a model
    over ``settings.max_params``), or None when it can."""
    try:
        checkpoint.read_config(path, settings.max_params)
    except PipelineError as err:
        return str(err).removeprefix(f"checkpoint {path}: ")
    return None


def checkpoints(settings: Settings) -> list[Path]:
    """The trained checkpoints of the state dir that can be served, oldest first.

    A directory that is not one (a crafted or half-copied config.json) is left out, so that
    it cannot stop every command until someone removes it; `moe-pipeline models` lists it
    with the reason.
    """
    return [p for p in checkpoint_dirs(settings) if unusable(p, settings) is None]


def served_path(settings: Settings) -> Path | None:
    """The checkpoint served: ``MOE_MODEL_PATH`` if set, else the newest usable one trained
    into the state dir, else none (the default model)."""
    if settings.model_path:
        return Path(settings.model_path)
    every = checkpoint_dirs(settings)
    usable = checkpoints(settings)
    skipped = every[every.index(usable[-1]) + 1:] if usable else every
    if skipped:
        log.warning("skipping %s under %s: unusable (see `moe-pipeline models`)",
                    ", ".join(p.name for p in skipped), models_dir(settings))
    return usable[-1] if usable else None


def model_config(settings: Settings) -> MoEConfig:
    """The config of the model the settings serve (read without loading weights), refused
    over ``settings.max_params`` parameters."""
    path = served_path(settings)
    return (checkpoint.read_config(path, settings.max_params) if path is not None
            else default_config())


def train_record(path: Path) -> dict:
    """What `moe-pipeline train` wrote beside a checkpoint (train.json): its ``mode`` and the
    numeric ``quality`` figures, empty where the file is absent or not such a record."""
    try:
        record = checkpoint.read_json(path / "train.json")
    except checkpoint.JsonFileError:
        return {}
    if not isinstance(record, dict):
        return {}
    quality = record.get("quality")
    quality = {str(k): v for k, v in quality.items() if isinstance(v, int | float)
               and not isinstance(v, bool)} if isinstance(quality, dict) else {}
    return {"mode": str(record.get("mode", "?"))[:40], "quality": quality}


def config_fingerprint(config: MoEConfig) -> str:
    return stable_id("config", json.dumps(config.to_dict(), sort_keys=True), length=16)


def model_fingerprint(settings: Settings, config: MoEConfig) -> str:
    """The config, the weights (the checkpoint's bytes, or the seed of the built-in model)
    and the text encoder, as one short id."""
    served = served_path(settings)
    if served is not None:
        digest = hashlib.sha256()
        for path in sorted(served.glob("*.safetensors")):
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        # The names in index order too: the same weights under permuted names are another
        # model (each name is a different set of supervisor rows).
        order = checkpoint.constellation_order(config) or []
        weights = digest.hexdigest() + (f" order={order}" if len(order) > 1 else "")
    else:
        weights = f"seed={settings.seed}"
    encoder = Path(settings.text_model).name if settings.text_model else "bundled-minilm"
    return stable_id("model", config_fingerprint(config), weights, encoder, length=16)


def build_system(config: MoEConfig, settings: Settings) -> MixtureOfExpertsSystem:
    """A new system for ``config``, seeded by the settings, its supervisor started from the
    constellations' encoded descriptions (names alone where none is given) when the text
    encoder is installed, so that it routes by meaning before any training."""
    budget.check_moe("the model config", config, settings.max_params)
    torch.manual_seed(settings.seed)
    system = MixtureOfExpertsSystem(config)
    if config.constellations is not None:
        try:
            protos = description_prototypes(config.constellation_descriptions(),
                                            config.input_dim, settings.seed,
                                            settings.text_model)
        except EncoderUnavailable:
            log.warning("no text encoder: the supervisor starts untrained (routing is noise "
                        "until `moe-pipeline train`)")
        else:
            system.init_supervisor(protos)
    return system


def load_system(settings: Settings, device: str | None = None) -> MixtureOfExpertsSystem:
    """The served model on ``device`` (default: the settings'), in eval mode."""
    path = served_path(settings)
    if path is not None:  # counted (model_config) before anything is allocated
        system = MixtureOfExpertsSystem(model_config(settings)).load(path)
    else:
        system = build_system(default_config(), settings)
    return system.to(device or settings.torch_device()).eval()

