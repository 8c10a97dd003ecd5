"""Which model is served: its config, its fingerprint, and the system built from it.

The served model is the checkpoint at ``MOE_MODEL_PATH`` or, with none, the default model
built from ``MOE_SEED`` (the same weights in every process, so a redelivered batch drafts the
same reports wherever it runs). A fingerprint names what makes two processes draft the same
reports: the config, the weights and the text encoder. Every job records the fingerprint it
was submitted for, and a GPU worker serving another refuses the batch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pipeline.moe import checkpoint
from pipeline.moe.config import MoEConfig
from pipeline.moe.system import MixtureOfExpertsSystem
from pipeline.records import stable_id
from pipeline.settings import Settings


def default_config() -> MoEConfig:
    """The model the pipeline serves when ``MOE_MODEL_PATH`` names none: small enough for a
    laptop CPU, with four constellations of two experts, one chosen per item."""
    return MoEConfig(input_dim=128, hidden_dim=256, output_dim=128, num_experts=8,
                     top_k_experts=2, num_layers=2, use_compile=False, use_amp=False,
                     constellations={"mathematics": [0, 1], "language": [2, 3],
                                     "vision": [4, 5], "memory": [6, 7]})


def model_config(settings: Settings) -> MoEConfig:
    """The config of the model the settings name (read without loading weights)."""
    if settings.model_path:
        return checkpoint.read_config(settings.model_path)
    return default_config()


def config_fingerprint(config: MoEConfig) -> str:
    return stable_id("config", json.dumps(config.to_dict(), sort_keys=True), length=16)


def model_fingerprint(settings: Settings, config: MoEConfig) -> str:
    """The config, the weights (the checkpoint's bytes, or the seed of the built-in model)
    and the text encoder, as one short id."""
    if settings.model_path:
        digest = hashlib.sha256()
        for path in sorted(Path(settings.model_path).glob("*.safetensors")):
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        weights = digest.hexdigest()
    else:
        weights = f"seed={settings.seed}"
    encoder = Path(settings.text_model).name if settings.text_model else "bundled-minilm"
    return stable_id("model", config_fingerprint(config), weights, encoder, length=16)


def load_system(settings: Settings, device: str | None = None) -> MixtureOfExpertsSystem:
    """The served model on ``device`` (default: the settings'), in eval mode."""
    if settings.model_path:
        system = MixtureOfExpertsSystem.from_pretrained(settings.model_path)
    else:
        torch.manual_seed(settings.seed)
        system = MixtureOfExpertsSystem(default_config())
    return system.to(device or settings.torch_device()).eval()


def constellation_map(config: MoEConfig) -> dict[str, list[str]]:
    """Constellation name -> its experts' names (what the graph's model nodes hold)."""
    names = config.expert_names()
    return {name: [names[e] for e in members] for name, members in
            config.constellation_members()}
