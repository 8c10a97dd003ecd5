"""The `moe-pipeline` command line.

Every `PipelineError` becomes one line on stderr and exit status 1.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import click
import torch

from pipeline.config import GATE_TYPES, MoEConfig, Settings
from pipeline.errors import PipelineError
from pipeline.moe.analysis import entropy, expert_usage, parameter_counts
from pipeline.moe.layer import MoELayer


@click.group()
def cli() -> None:
    """moe-pipeline: mixture-of-experts routing, deduplicated insights in a graph."""


def _mixture_task(num_tasks: int, dim: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A mixture of linear regression problems: the cluster an input is in picks its map."""
    centres = torch.randn(num_tasks, dim, generator=gen) * 3
    maps = torch.randn(num_tasks, dim, dim, generator=gen) / dim**0.5
    return centres, maps


def _batch(centres, maps, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    task = torch.randint(0, centres.shape[0], (n,), generator=gen)
    x = centres[task] + torch.randn(n, centres.shape[1], generator=gen)
    y = torch.einsum("nd,nde->ne", x, maps[task])
    return x, y


@cli.command()
@click.option("--gate", "gate_type", type=click.Choice(GATE_TYPES), default="topk",
              show_default=True)
@click.option("--experts", "num_experts", default=8, show_default=True)
@click.option("--top-k", "top_k", default=2, show_default=True)
@click.option("--expert-type", type=click.Choice(["standard", "gated", "cur"]),
              default="gated", show_default=True)
@click.option("--steps", default=200, show_default=True)
@click.option("--dim", default=32, show_default=True)
def demo(gate_type: str, num_experts: int, top_k: int, expert_type: str, steps: int,
         dim: int) -> None:
    """Train one MoE layer on a mixture of regression problems and show its routing."""
    settings = Settings()
    torch.manual_seed(settings.seed)
    device = settings.torch_device()
    cfg = MoEConfig(input_dim=dim, hidden_dim=4 * dim, output_dim=dim, num_experts=num_experts,
                    top_k_experts=1 if gate_type == "switch" else top_k, gate_type=gate_type,
                    expert_type=expert_type, cur_rank=min(16, dim))
    layer = MoELayer(cfg).to(device)
    gen = torch.Generator().manual_seed(settings.seed)
    centres, maps = _mixture_task(4, dim, gen)
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)
    counts = parameter_counts(layer)
    click.echo(f"MoE layer: {num_experts} {expert_type} experts, gate={gate_type}, "
               f"k={cfg.top_k_experts}, {counts['total']:,} parameters "
               f"({counts['active']:,} active per token), device={device}")
    start, losses = time.perf_counter(), []
    for step in range(steps):
        x, y = (t.to(device) for t in _batch(centres, maps, 256, gen))
        out, aux = layer(x)
        loss = torch.nn.functional.mse_loss(out, y)
        opt.zero_grad(set_to_none=True)
        (loss + aux.loss).backward()
        opt.step()
        layer.update_balance_bias(aux.counts)
        losses.append(loss.item())  # logging sync, outside the layer's forward
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            click.echo(f"  step {step:4d}  task loss {losses[-1]:.4f}  "
                       f"balance {aux.balance_loss.item():.3f}")
    elapsed = time.perf_counter() - start
    layer.eval()
    with torch.no_grad():
        x, _ = _batch(centres, maps, 4096, gen)
        out, aux = layer(x.to(device))
    usage = expert_usage(aux)
    click.echo(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} steps "
               f"({steps * 256 / elapsed:,.0f} training tokens/s)")
    click.echo("expert usage (% of assignments): " + "  ".join(
        f"e{i}:{p:.1f}" for i, p in enumerate(usage["percent"])))
    if cfg.gate_type in ("topk", "switch", "noisy_topk"):
        probs = layer.gate.router(x.to(device)).softmax(-1)
        h = entropy(probs)
        click.echo(f"routing entropy {h['entropy']:.3f} nats ({h['normalized']:.0%} of maximum)")


def main(argv: Sequence[str] | None = None) -> None:
    try:
        cli.main(args=argv, standalone_mode=False)
    except PipelineError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
