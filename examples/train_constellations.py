"""Train a small MoE system on a mixture of regression problems and watch experts specialise.

Four sub-populations of inputs, each with its own linear map to the targets; four named
constellations of experts. After training, the table shows which constellation the supervisor
sends each sub-population to, and how concentrated the routing is.

    python examples/train_constellations.py [--steps 300]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from pipeline import MoEConfig
from pipeline.moe.analysis import entropy
from pipeline.moe.optimized import FullyOptimizedMoESystem

DOMAINS = ["mathematics", "language", "vision", "memory"]


def make_task(gen: torch.Generator, dim: int, out: int):
    centres = torch.randn(len(DOMAINS), dim, generator=gen) * 2.5
    maps = torch.randn(len(DOMAINS), dim, out, generator=gen) / dim**0.5

    def batch(n: int, seq: int = 8):
        task = torch.randint(0, len(DOMAINS), (n,), generator=gen)
        x = centres[task].unsqueeze(1) + torch.randn(n, seq, dim, generator=gen)
        return x, torch.einsum("bnd,bdo->bno", x, maps[task]), task

    return batch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = MoEConfig(input_dim=32, hidden_dim=64, output_dim=16, num_experts=8, top_k_experts=2,
                    expert_type="gated", num_layers=2,
                    constellations={"mathematics": [0, 1], "language": [2, 3],
                                    "vision": [4, 5], "memory": [6, 7]},
                    use_compile=False, use_amp=False)
    system = FullyOptimizedMoESystem(cfg)
    batch = make_task(torch.Generator().manual_seed(0), cfg.input_dim, cfg.output_dim)
    opt = torch.optim.AdamW(system.parameters(), lr=3e-3)
    losses = []
    for step in range(args.steps):
        x, y, _ = batch(128)
        losses.append(system.training_step((x, y), opt, F.mse_loss))
        if step % max(1, args.steps // 6) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}")

    system.eval()
    x, y, task = batch(2048)
    with torch.no_grad():
        out = system.draft_reports(x)
    chosen = out.decision.chosen[:, 0]
    names = system.constellation.names
    print(f"\nloss {losses[0]:.4f} -> {losses[-1]:.4f}; eval mse "
          f"{F.mse_loss(out.output, y).item():.4f}\n")
    header = "sub-population  " + "".join(f"{n:>13}" for n in names) + "   entropy"
    print(header)
    print("-" * len(header))
    table = {}
    for t, domain in enumerate(DOMAINS):
        picks = chosen[task == t]
        share = torch.bincount(picks, minlength=len(names)).float() / max(1, picks.numel())
        h = entropy(out.decision.probs[task == t])["entropy"]
        table[domain] = share.tolist()
        print(f"{domain:<16}" + "".join(f"{v:>12.0%} " for v in share.tolist()) + f"  {h:.3f}")
    usage = torch.stack([a.load for a in out.aux]).mean(0)
    print("\nexpert load (mean over layers): "
          + "  ".join(f"e{i}:{v:.0%}" for i, v in enumerate(usage.tolist())))
    return {"first_loss": losses[0], "last_loss": losses[-1], "table": table}


if __name__ == "__main__":
    main()
