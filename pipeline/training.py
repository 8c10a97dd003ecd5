"""``moe-pipeline train``: fit the served model to a corpus and make it the served model.

Which constellations (first that applies):

1. named ones (``--constellations NAME[=DESCRIPTION] ...``) or a config file's;
2. with a label field and neither, the label values;
3. with ``num_constellations`` K, K found in the data: spherical k-means in the encoder's
   space (centred on the corpus mean), named and described by their distinctive terms
   (class-based TF-IDF, as BERTopic names topics), so the graph's Constellation nodes read
   as topics;
4. else the served model's own.

Where items carry a label (``label_field``, read from ``meta``), training is supervised: the
label must name a constellation. Otherwise each item's target is found in the data: its
k-means cluster, or, with named constellations, the cluster it falls into when k-means starts
from their encoded descriptions. A held-out part (a fifth of the items, chosen by id) is
routed after training and compared with the labels (NMI, purity, accuracy) or, without
labels, with the targets. The checkpoint goes under ``<state dir>/models``; the newest one
is what ``run``, ``submit``, the workers and ``similar`` serve unless ``MOE_MODEL_PATH``
names another.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import encoders, serving
from pipeline.errors import ConfigError, PipelineError
from pipeline.inputs import read_items
from pipeline.moe import budget, checkpoint
from pipeline.moe.config import MoEConfig
from pipeline.quality import accuracy, nmi, purity
from pipeline.records import Item, stable_id
from pipeline.settings import Settings
from pipeline.topics import describe_topics, kmeans, name_topics

Source = str | Path | list[dict[str, Any]]
EXPERTS_PER_CONSTELLATION = 2


class TrainError(PipelineError):
    """Training was asked for something the corpus or the options cannot give."""


@dataclass
class TrainResult:
    path: Path
    fingerprint: str
    mode: str  # "supervised" or "unsupervised"
    constellations: dict[str, str]  # name -> description
    losses: list[float]
    held_out: int
    quality: dict[str, float]  # nmi, purity (and accuracy with labels) on the held-out part
    seconds: float
    # what ``quality`` was measured against: the label field, a meta field the items carry
    # (unsupervised), or None (nothing to compare with: no figure)
    compared_with: str | None = None


# What a --config file held, when it was JSON but not an object.
_JSON_KINDS = {str: "a string", int: "a number", float: "a number", list: "a list",
               bool: "a boolean", type(None): "a null"}


def read_config_file(file: str | Path, settings: Settings) -> MoEConfig:
    """``train --config FILE``: a `MoEConfig` as JSON, every fault one `TrainError` naming
    the file and the field, the model it describes counted before anything is built."""
    file = Path(file)
    try:
        data = checkpoint.read_json(file)
    except checkpoint.JsonFileError as err:
        raise TrainError(f"--config {err}") from err
    if not isinstance(data, dict):  # "abc" or 5 is JSON too, and no config
        raise TrainError(f"--config {file}: expected a JSON object of MoEConfig fields, got "
                         f"{_JSON_KINDS.get(type(data), 'another')} JSON value")
    try:
        config = MoEConfig.from_dict(data)
    except ConfigError as err:
        text = " ".join(str(err).split())
        raise TrainError(f"--config {file}: {text[:300]}") from err
    except TypeError as err:  # a field name that is not a string cannot reach here from JSON
        raise TrainError(f"--config {file}: {err}") from err
    budget.check_moe(file, config, settings.max_params)
    return config


def parse_constellations(specs: Sequence[str]) -> dict[str, str]:
    """``NAME[=DESCRIPTION]`` options to name -> description."""
    out: dict[str, str] = {}
    for spec in specs:
        name, _, description = spec.partition("=")
        if not name.strip():
            raise TrainError(f"--constellations {spec!r}: expected NAME or NAME=DESCRIPTION")
        out[name.strip()] = description.strip()
    return out


def _labels(items: Sequence[Item], field: str | None) -> list[str | None] | None:
    if field is None:
        return None
    labels = [item.meta.get(field) for item in items]
    if all(v is None for v in labels):
        raise TrainError(f"label field {field!r} is in no item's meta (items carry "
                         f"{sorted({k for i in items for k in i.meta}) or 'no meta'})")
    return [None if v is None else str(v) for v in labels]


def label_like_field(items: Sequence[Item]) -> str | None:
    """A meta field that looks like a label: a string in every item, with 2 to 50 values
    and fewer values than half the items (what unsupervised training is compared with)."""
    if not items:
        return None
    common = set.intersection(*(set(i.meta) for i in items))
    for field in sorted(common):
        values = [i.meta[field] for i in items]
        if all(isinstance(v, str) for v in values) and 2 <= len(set(values)) <= min(
                50, len(items) // 2):
            return field
    return None


def _with_constellations(base: MoEConfig, names: dict[str, str]) -> MoEConfig:
    """``base``'s hyperparameters with these constellations, two experts each."""
    k = EXPERTS_PER_CONSTELLATION
    groups = {name: {"experts": list(range(k * g, k * g + k)), "description": desc}
              for g, (name, desc) in enumerate(names.items())}
    top_c = (None if base.top_k_constellations is None
             else min(base.top_k_constellations, len(names)))
    return dataclasses.replace(base, num_experts=k * len(names), constellations=groups,
                               top_k_experts=min(base.top_k_experts, k),
                               expert_specializations=None, top_k_constellations=top_c)


def _held_out(items: Sequence[Item], share: float = 0.2, salt: str = "split") -> np.ndarray:
    """A fixed share of the items, by a hash of their ids: the same split every run."""
    return np.array([int(stable_id(salt, i.id, length=8), 16) % 1000 < share * 1000
                     for i in items], dtype=bool)


def _seeded_kmeans(x_ND: torch.Tensor, protos_GD: torch.Tensor, iters: int = 20) -> np.ndarray:
    """Spherical k-means started from the prototypes (so cluster g stays constellation g)."""
    x = torch.nn.functional.normalize(x_ND, dim=-1)
    c = torch.nn.functional.normalize(protos_GD, dim=-1)
    for _ in range(iters):
        labels = (x @ c.t()).argmax(1)
        for g in range(c.shape[0]):
            members = x[labels == g]
            if len(members):
                c[g] = torch.nn.functional.normalize(members.mean(0), dim=0)
    return (x @ c.t()).argmax(1).numpy()


def train(source: Source, settings: Settings, *, constellations: dict[str, str] | None = None,
          config: MoEConfig | None = None, label_field: str | None = None,
          num_constellations: int | None = None, epochs: int = 30, lr: float = 1e-3,
          on_epoch: Callable[[int, float], None] | None = None) -> TrainResult:
    """Fit a model to the items of ``source`` and write it as the served checkpoint."""
    start = time.perf_counter()
    _check_options(constellations, config, label_field, num_constellations)
    items, bad = read_items(source)
    if not items:
        raise TrainError(f"{source if not isinstance(source, list) else 'the items'}: no valid "
                         f"item to train on ({len(bad)} bad)")
    labels = _labels(items, label_field)
    base = config or serving.model_config(settings)
    names: dict[str, str]
    if constellations:
        names = dict(constellations)
    elif config is not None and config.constellations is not None:
        names = config.constellation_descriptions()
    elif labels is not None:
        names = {v: "" for v in sorted({v for v in labels if v is not None})}
    elif num_constellations:
        names = {}
    else:
        names = base.constellation_descriptions()
    x = encoders.encode_items(items, base.input_dim, settings.seed, settings.text_model)
    texts = [item.text or "" for item in items]
    targets: np.ndarray
    if labels is not None:
        unknown = sorted({v for v in labels if v is not None and v not in names})
        if unknown:
            example = next(i for i, v in zip(items, labels, strict=True) if v == unknown[0])
            raise TrainError(f"item {example.id!r} (line {example.line}): {label_field}="
                             f"{unknown[0]!r} names no constellation (they are "
                             f"{', '.join(names)})")
        index = {name: g for g, name in enumerate(names)}
        targets = np.array([-1 if v is None else index[v] for v in labels], np.int64)
        mode = "supervised"
    elif not names:  # found in the data, named from it
        if num_constellations is None or num_constellations < 1:
            raise TrainError("--num-constellations must be a positive integer")
        if num_constellations > len(items):
            raise TrainError(f"--num-constellations {num_constellations}: more than the "
                             f"{len(items)} items")
        # Centred first: sentence embeddings share a common direction that k-means would
        # otherwise spend clusters on ("all-but-the-top", arXiv:1702.01417; measured on
        # examples/texts.jsonl: NMI 0.91 centred, 0.75 not; WordNet verbs 0.40 and 0.42).
        found, _ = kmeans(x - x.mean(0), num_constellations, seed=settings.seed)
        targets = found.numpy().astype(np.int64)
        names = dict(zip(name_topics(texts, targets), describe_topics(texts, targets),
                         strict=True))
        mode = "unsupervised"
    else:
        protos = encoders.description_prototypes(names, base.input_dim, settings.seed,
                                                 settings.text_model)
        targets = _seeded_kmeans(x, protos)
        mode = "unsupervised"
    if config is not None and not constellations and config.constellations is not None:
        cfg = config  # its own constellations, kept
    else:
        cfg = _with_constellations(base, names)
    if [n for n, _ in cfg.constellation_members()] != list(names):
        raise TrainError(f"the model's constellations {[n for n, _ in cfg.constellation_members()]}"
                         f" are not the ones trained for ({list(names)})")
    system = serving.build_system(cfg, settings)
    if mode == "unsupervised" and not constellations and config is None and labels is None \
            and num_constellations:
        # the supervisor starts at the clusters themselves: the data's own prototypes
        centroids = torch.stack([x[torch.from_numpy(targets == g)].mean(0)
                                 for g in range(len(names))])
        system.init_supervisor(centroids)
    held = _held_out(items) if len(items) >= 10 else np.zeros(len(items), dtype=bool)
    # A tenth of the training part picks the epoch to keep (early stopping); the held-out
    # fifth is only ever used to report.
    val = _held_out(items, 0.1, salt="validation") & ~held if len(items) >= 50 else \
        np.zeros(len(items), dtype=bool)
    fit_rows = torch.from_numpy(~held & ~val)
    known_val = torch.from_numpy(val & (targets >= 0))
    validation = ((x[known_val], torch.from_numpy(targets)[known_val])
                  if bool(known_val.any()) else None)
    result = system.fit(x[fit_rows], torch.from_numpy(targets)[fit_rows], epochs=epochs,
                        lr=lr, seed=settings.seed, validation=validation, on_epoch=on_epoch)
    compared_with = label_field
    if labels is None:
        # Unsupervised: agreement with the clusters it was fitted to is about 1 whatever the
        # model learnt, so the held-out routing is compared with a label-like meta field of
        # the file when there is one, and reported as nothing otherwise.
        compared_with = label_like_field(items)
        labels = _labels(items, compared_with) if compared_with else None
    quality = (_quality(system, x, held if held.any() else ~held, targets, labels, names)
               if compared_with else {})
    if compared_with and not label_field and num_constellations:  # names found: no accuracy
        quality.pop("accuracy", None)
    path = _save(system, settings, mode, source, quality)
    fingerprint = serving.model_fingerprint(settings.model_copy(update={"model_path": path}),
                                            system.config)
    return TrainResult(path, fingerprint, mode, dict(names), result.losses, int(held.sum()),
                       quality, time.perf_counter() - start, compared_with)


def _check_options(constellations: dict[str, str] | None, config: MoEConfig | None,
                   label_field: str | None, num_constellations: int | None) -> None:
    """Options that contradict each other, or ask for nothing, are refused before any work:
    each used to be ignored in silence (0 topics retrained and served the old model)."""
    if num_constellations is not None:
        if num_constellations < 1:
            raise TrainError(f"--num-constellations {num_constellations}: must be 1 or more")
        named = [opt for opt, given in (("--label-field", label_field),
                                        ("--constellations", constellations),
                                        ("--config", config is not None
                                         and config.constellations is not None)) if given]
        if named:
            raise TrainError(f"--num-constellations finds topics in the data; {named[0]} names "
                             "them: give one or the other")
    if constellations is not None and not constellations:
        raise TrainError("--constellations: no name given")
    if label_field is not None and not label_field.strip():
        raise TrainError("--label-field: an empty field name")


@torch.no_grad()
def _quality(system: Any, x: torch.Tensor, rows: np.ndarray, targets: np.ndarray,
             labels: list[str | None] | None, names: dict[str, str]) -> dict[str, float]:
    """Routing of the held-out items against their labels (or, without, their targets)."""
    chosen = system.run(x[torch.from_numpy(rows)]).decision.chosen[:, 0].numpy()
    names_list = list(names)
    routed = [names_list[g] for g in chosen]
    truth = ([labels[i] for i in np.flatnonzero(rows)] if labels is not None
             else [names_list[t] for t in targets[rows]])
    keep = [i for i, t in enumerate(truth) if t is not None]
    truth = [truth[i] for i in keep]
    routed = [routed[i] for i in keep]
    if not truth:
        return {}
    return {"nmi": nmi(truth, routed), "purity": purity(truth, routed),
            "accuracy": accuracy(truth, routed)}


def _save(system: Any, settings: Settings, mode: str, source: Source,
          quality: dict[str, float]) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = serving.models_dir(settings)
    path = root / f"{stamp}-{stable_id('model', str(time.time_ns()), length=8)}"
    system.save(path)
    (path / "train.json").write_text(json.dumps({
        "mode": mode, "source": source if isinstance(source, str | Path) and not isinstance(
            source, list) else f"{len(source)} items", "quality": quality,
        "created_at": time.time()}, default=str, indent=2))
    return path
