"""How big a model a config asks for, counted before a single tensor is allocated.

A config file is a few hundred bytes; the model it describes can be any size. A crafted
1 KB checkpoint ``config.json`` (``num_experts`` 4096, ``hidden_dim`` 65536) asked for
17 GB, and a Hugging Face config of 100,000 layers grew the process past 2.4 GB before
anything said no. So every model built from a file is counted first, by arithmetic on the
config alone (`moe_parameters`, `llama_parameters`), and refused over a bound
(`check_parameters`): one line with the count and the bound, raised with ``--max-params``
(``MOE_MAX_PARAMS``). The bound's default, 2e9 parameters, holds every model this pipeline
serves on one machine with room (8 GB of float32) and stops a typo's petabyte; a count whose
bytes exceed the memory the kernel says is available is refused whatever the bound, since the
allocation could only fail or bring in the OOM killer.

Legend: E experts, I input dim, H hidden dim, O output dim, R CUR rank, C constellations,
V vocabulary, D model dim, F MLP hidden dim, L layers.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.moe.config import MoEConfig

DEFAULT_MAX_PARAMS = 2_000_000_000
# The hash gate draws an (its buckets x E) float32 table once while it is built.
HASH_BUCKETS = 65536
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class ModelTooLarge(PipelineError):
    """A config that describes a model over the parameter bound or the available memory.

    Attributes:
        source: the config's file (or what the model was built from).
        count: the parameters the config asks for.
        bound: the bound it exceeds.
    """

    def __init__(self, source: str | Path, count: int, bound: int, message: str) -> None:
        self.source, self.count, self.bound = source, count, bound
        super().__init__(f"{source}: {message}")


def _expert(cfg: MoEConfig, fan_in: int, hidden: int, fan_out: int) -> int:
    """Parameters of one expert ``fan_in -> hidden -> fan_out`` (`experts.Experts`)."""
    if cfg.expert_type == "cur":
        rank = cfg.cur_rank  # R (rank, in), U (rank, rank), C (out, rank) per matrix
        return (rank * fan_in + rank * rank + hidden * rank
                + rank * hidden + rank * rank + fan_out * rank)
    matrices = 3 if cfg.expert_type == "gated" else 2
    return (matrices - 1) * hidden * fan_in + fan_out * hidden


def moe_parameters(cfg: MoEConfig) -> int:
    """The parameters (and transient elements) `MixtureOfExpertsSystem(cfg)` allocates.

    Blocks map I -> I (a residual stream); the head maps I -> O. Counted from the modules'
    constructors; `tests/test_model_files_adversarial.py` holds it to real models.
    """
    I, E = cfg.input_dim, cfg.num_experts
    C = len(cfg.constellation_members())
    experts = E * _expert(cfg, I, cfg.hidden_dim, I)
    if cfg.num_shared_experts:
        experts += _expert(cfg, I, cfg.hidden_dim * cfg.num_shared_experts, I)
    # A learned gate has a router (E, I); the noisy one a second for its noise scale.
    routers = {"topk": 1, "switch": 1, "noisy_topk": 2}.get(cfg.gate_type, 0)
    router = routers * E * I
    table = HASH_BUCKETS * E if cfg.gate_type == "hash" else 0
    block = 2 * I + experts + router + table
    supervisor = 2 * I + 2 * I * I + I + C * I + C
    return cfg.num_layers * block + supervisor + 2 * I + I * cfg.output_dim + cfg.output_dim


def llama_parameters(v: int, d: int, f: int, layers: int, heads: int, kv_heads: int,
                     head_dim: int, tied: bool) -> int:
    """Parameters of a ``LlamaForCausalLM`` of these sizes (biases left out: none by
    default, and a few thousand when a config turns them on)."""
    attention = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
    layer = attention + 3 * d * f + 2 * d
    return v * d * (1 if tied else 2) + layers * layer + d


def available_bytes() -> int | None:
    """Memory the kernel could hand out now (MemAvailable plus free swap), None where
    /proc/meminfo is absent (not Linux)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    fields = {line.split(":")[0]: line.split()[1] for line in lines if ":" in line}
    try:
        return (int(fields["MemAvailable"]) + int(fields.get("SwapFree", 0))) * 1024
    except (KeyError, ValueError):
        return None


def check_parameters(source: str | Path, count: int, bound: int,
                     bytes_per_param: int = 4) -> None:
    """Refuse ``count`` parameters over ``bound`` or over the memory available."""
    if count > bound:
        raise ModelTooLarge(source, count, bound, f"the model would have {count:,} "
                            f"parameters, over the bound of {bound:,} (raise it with "
                            "--max-params or MOE_MAX_PARAMS if that is meant)")
    available = available_bytes()
    if available is not None and count * bytes_per_param > available:
        raise ModelTooLarge(source, count, available // bytes_per_param,
                            f"the model would have {count:,} parameters "
                            f"({count * bytes_per_param / 2**30:.1f} GiB), more than the "
                            f"{available / 2**30:.1f} GiB of memory available")


def check_moe(source: str | Path, cfg: MoEConfig, bound: int) -> None:
    """`check_parameters` for the system a `MoEConfig` describes."""
    check_parameters(source, moe_parameters(cfg), bound, DTYPE_BYTES[cfg.dtype])
