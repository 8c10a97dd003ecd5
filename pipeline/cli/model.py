"""Commands on the model: ``train`` (fit the served model to a corpus), ``models`` (the
checkpoints and which is served), ``demo`` (one layer on a toy task), ``generate`` (a Llama
converted to MoE, generating with its expert statistics)."""

from __future__ import annotations

import time
from typing import cast

import click

from pipeline.cli.bounds import Count, Real
from pipeline.cli.progress import progress
from pipeline.cli.text import printable
from pipeline.moe.config import EXPERT_TYPES, GATE_TYPES, ROUTER_GATES, TOKEN_CHOICE_GATES
from pipeline.settings import Settings

# Experts in a layer made here: a demo or a converted Llama keeps every expert's weights in
# memory, and past a few hundred the command only runs out of it.
MAX_EXPERTS = 256


@click.command()
@click.option("--gate", "gate_type", type=click.Choice(GATE_TYPES), default="topk",
              show_default=True)
@click.option("--experts", "num_experts", type=Count(1, MAX_EXPERTS), default=8,
              show_default=True)
@click.option("--top-k", "top_k", type=Count(1, MAX_EXPERTS), default=2, show_default=True)
@click.option("--expert-type", type=click.Choice(EXPERT_TYPES),
              default="gated", show_default=True)
@click.option("--steps", type=Count(1, 1_000_000), default=200, show_default=True)
@click.option("--dim", type=Count(1, 1024), default=32, show_default=True)
@click.pass_obj
def demo(settings: Settings, gate_type: str, num_experts: int, top_k: int, expert_type: str,
         steps: int, dim: int) -> None:
    """Train one MoE layer on a mixture of regression problems and show its routing."""
    import torch

    from pipeline.moe.analysis import entropy, expert_usage, parameter_counts
    from pipeline.moe.config import MoEConfig
    from pipeline.moe.gating import Router
    from pipeline.moe.layer import MoELayer
    from pipeline.moe.toy import mixture_task, sample

    torch.manual_seed(settings.seed)
    device = settings.torch_device()
    cfg = MoEConfig(input_dim=dim, hidden_dim=4 * dim, output_dim=dim, num_experts=num_experts,
                    top_k_experts=1 if gate_type == "switch" else top_k, gate_type=gate_type,
                    expert_type=expert_type, cur_rank=min(16, dim))
    layer = MoELayer(cfg).to(device)
    gen = torch.Generator().manual_seed(settings.seed)
    centres, maps = mixture_task(4, dim, gen)
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)
    counts = parameter_counts(layer)
    click.echo(f"MoE layer: {num_experts} {expert_type} experts, gate={gate_type}, "
               f"k={cfg.top_k_experts}, {counts['total']:,} parameters "
               f"({counts['active']:,} active per token), device={device}")
    start, losses = time.perf_counter(), []
    for step in range(steps):
        x, y = (t.to(device) for t in sample(centres, maps, 256, gen))
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
        x, _ = sample(centres, maps, 4096, gen)
        out, aux = layer(x.to(device))
    usage = expert_usage(aux)
    click.echo(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} steps "
               f"({steps * 256 / elapsed:,.0f} training tokens/s)")
    click.echo("expert usage (% of assignments): " + "  ".join(
        f"e{i}:{p:.1f}" for i, p in enumerate(usage["percent"])))
    if cfg.gate_type in ROUTER_GATES:
        probs = cast(Router, layer.gate.router)(x.to(device)).softmax(-1)
        h = entropy(probs)
        click.echo(f"routing entropy {h['entropy']:.3f} nats ({h['normalized']:.0%} of maximum)")



def _load_llama(model_path: str | None, tokenizer_path: str | None, tiny: bool,
                max_params: int):
    """``(dense Llama, tokenizer)``: the tiny local one, or one read from the user's files."""
    if tiny:
        if model_path or tokenizer_path:
            raise click.UsageError("--tiny makes its own model and tokenizer: give it no MODEL "
                                   "and no --tokenizer")
        import torch

        from pipeline.moe.tiny_llama import CharTokenizer, describe, tiny_llama

        # Its matrices are 64 wide: threads only add synchronisation, and on a busy machine
        # two threads made 34 tokens take 17 s where one thread takes 0.1 s.
        torch.set_num_threads(1)
        model = tiny_llama()
        click.echo(describe(model))
        return model, CharTokenizer()
    if model_path is None:
        raise click.UsageError("give MODEL (a llama2.c .bin with --tokenizer, or a Hugging Face "
                               "Llama directory), or --tiny for a tiny random model made here")
    from pipeline.moe.llama_files import load_llama

    return load_llama(model_path, tokenizer_path, max_params)


def _parse_layers(layers: str, n: int) -> list[int]:
    if layers == "all":
        return list(range(n))
    try:
        return [int(i) for i in layers.split(",")]
    except ValueError:
        raise click.BadParameter(f"{layers!r}: 'all' or 0-based indices such as 0,2",
                                 param_hint="--layers") from None


@click.command()
@click.argument("model_path", metavar="[MODEL]", required=False)
@click.option("--tokenizer", "tokenizer_path", metavar="PATH",
              help="llama2.c's tokenizer.bin for a .bin MODEL; for a directory MODEL, the "
                   "tokenizer's directory [default: MODEL itself]")
@click.option("--tiny", is_flag=True,
              help="instead of MODEL, a tiny random Llama made here (4 layers, fixed seed, a "
                   "character tokenizer): the conversion and the routing offline, in seconds; "
                   "its text is noise. A flag rather than a MODEL name, so that no file or "
                   "directory called 'tiny' is ever shadowed")
@click.option("--layers", default="all", show_default=True,
              help="decoder layers to convert, 0-based, comma-separated")
@click.option("--experts", "num_experts", type=Count(1, MAX_EXPERTS), default=8,
              show_default=True)
@click.option("--top-k", "top_k", type=Count(1, MAX_EXPERTS), default=2, show_default=True)
@click.option("--init", "init", default="perturb", show_default=True,
              type=click.Choice(["copy", "perturb", "split", "random"]))
@click.option("--gate", "gate_type", default="topk", show_default=True,
              type=click.Choice(TOKEN_CHOICE_GATES))
@click.option("--prompt", default="Once upon a time", show_default=True)
@click.option("--max-new-tokens", type=Count(1, 100_000), default=64, show_default=True)
@click.option("--temperature", type=Real(0.0, 100.0), default=0.9, show_default=True,
              help="0: greedy")
@click.option("--seed", type=Count(0, 2**32 - 1), default=0, show_default=True)
@click.pass_obj
def generate(settings: Settings, model_path: str | None, tokenizer_path: str | None,
             tiny: bool, layers: str,
             num_experts: int, top_k: int, init: str, gate_type: str, prompt: str,
             max_new_tokens: int, temperature: float, seed: int) -> None:
    """Convert a Llama to MoE and generate, showing which experts fired.

    MODEL is a llama2.c checkpoint (stories15M.bin, with --tokenizer tokenizer.bin) or a
    Hugging Face Llama directory (save_pretrained's config.json, weights and tokenizer). With
    nothing downloaded, --tiny shows the same mechanics on a tiny random model.
    """
    from pipeline.moe.budget import check_parameters
    from pipeline.moe.llama import (
        convert_to_moe,
        converted_parameters,
        count_active_parameters,
        count_parameters,
    )
    from pipeline.moe.llama import generate as run_generation

    dense, tok = _load_llama(model_path, tokenizer_path, tiny, settings.max_params)
    n = len(dense.model.layers)
    chosen = _parse_layers(layers, n)
    check_parameters(f"--experts {num_experts}",
                     converted_parameters(dense, chosen, num_experts, init),
                     settings.max_params)
    moe = convert_to_moe(dense, chosen, num_experts=num_experts,
                         top_k=1 if gate_type == "switch" else top_k,
                         expert_init_strategy=init, gate_type=gate_type, seed=seed)
    click.echo(f"converted layers {chosen} of {n}: {count_parameters(moe):,} parameters, "
               f"{count_active_parameters(moe):,} active per token")
    result = run_generation(moe, tok, prompt, temperature=temperature,
                            max_new_tokens=max_new_tokens, seed=seed,
                            show_expert_stats=True, show_routing_entropy=True)
    click.echo(f"{prompt}{result.text}")


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--constellations", "specs", multiple=True, metavar="NAME[=DESCRIPTION]",
              help="a constellation to train (repeat for each)")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="a model config as JSON (MoEConfig fields), constellations included")
@click.option("--label-field", help="supervise from this field of each item's meta")
@click.option("--num-constellations", type=Count(1, 1024), help="find this many in the data")
@click.option("--epochs", type=Count(1, 100_000), default=30, show_default=True)
@click.pass_obj
def train(settings: Settings, file: str, specs: tuple[str, ...], config_file: str | None,
          label_field: str | None, num_constellations: int | None, epochs: int) -> None:
    """Fit the served model to a corpus (JSONL) and make it the served model."""
    from pipeline import training

    config = training.read_config_file(config_file, settings) if config_file else None
    with progress(epochs, "epochs") as bar:
        result = training.train(
            file, settings, constellations=training.parse_constellations(specs) or None,
            config=config, label_field=label_field, num_constellations=num_constellations,
            epochs=epochs, on_epoch=lambda epoch, loss: bar.update(1))
    click.echo(f"trained ({result.mode}) in {result.seconds:.1f} s: loss "
               f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    for name, description in result.constellations.items():
        click.echo(f"  {printable(name)}: {printable(description or '(no description)')}")
    if result.quality:
        click.echo(f"routing on {result.held_out} held-out items against meta."
                   f"{result.compared_with}: "
                   + "  ".join(f"{k} {v:.3f}" for k, v in result.quality.items()))
    else:
        click.echo("no label field to measure the routing against (give --label-field, or "
                   "items with a label in their meta)")
    click.echo(f"served model now {result.path} (fingerprint {result.fingerprint})")


@click.command()
@click.pass_obj
def models(settings: Settings) -> None:
    """The trained checkpoints of the state dir, and which one is served."""
    from pipeline import serving

    served = serving.served_path(settings)
    found = serving.checkpoints(settings)
    if settings.model_path:
        click.echo(f"served: {settings.model_path} (MOE_MODEL_PATH)")
    elif served is None:
        click.echo(f"served: the default model "
                   f"{serving.model_fingerprint(settings, serving.default_config())} (no "
                   f"trained checkpoint in {serving.models_dir(settings)})")
    for path in reversed(serving.checkpoint_dirs(settings)):
        mark = "*" if served is not None and path.resolve() == served.resolve() else " "
        reason = None if path in found else serving.unusable(path, settings)
        if reason is not None:
            click.echo(f"{mark} {path.name}  unusable: {reason}")
            continue
        config = serving.checkpoint.read_config(path, settings.max_params)
        meta = serving.train_record(path)
        quality = " ".join(f"{k}={v:.3f}" for k, v in meta.get("quality", {}).items())
        fingerprint = serving.model_fingerprint(
            settings.model_copy(update={"model_path": path}), config)
        click.echo(f"{mark} {path.name}  {fingerprint}  {str(meta.get('mode', '?')):<12} "
                   f"{printable(', '.join(n for n, _ in config.constellation_members()))}  "
                   f"{quality}")


COMMANDS = [demo, generate, train, models]
