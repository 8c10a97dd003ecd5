"""The `moe-pipeline` command line: one group, its commands in three modules.

- `run` — the pipeline: ``run``, ``submit``, ``status``, ``stats``, ``worker``;
- `graph` — questions and the embedded server: ``query``, ``similar``, ``up``, ``down``;
- `model` — the model: ``train``, ``models``, ``demo``, ``generate``.

The group builds `Settings` once and hands it to every command (``ctx.obj``); `main` turns
every `PipelineError` (and an unreachable SQL database or broker) into one line on stderr and
exit status 1. Commands import what they run inside their bodies: ``--help``, ``status``,
``query`` and ``down`` then never pay for importing torch.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import click

from pipeline import __version__
from pipeline.errors import PipelineError
from pipeline.redact import redacted
from pipeline.settings import Settings


@click.group()
@click.version_option(__version__, prog_name="moe-pipeline")
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False),
              help="serve this checkpoint [default: MOE_MODEL_PATH, else the newest trained "
                   "one of the state dir, else the default model]")
@click.option("--max-params", type=click.IntRange(min=1), metavar="N",
              help="refuse a model (checkpoint, --config, Llama) of more parameters than N, "
                   "counted before it is built [default: MOE_MAX_PARAMS, else 2e9]")
@click.pass_context
def cli(ctx: click.Context, model_path: str | None, max_params: int | None) -> None:
    """moe-pipeline: mixture-of-experts routing, deduplicated insights in a graph."""
    given = {k: v for k, v in (("model_path", model_path), ("max_params", max_params)) if v}
    ctx.obj = Settings(**given)


def _register() -> None:
    from pipeline.cli import graph, model, run

    for module in (run, graph, model):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def _error(message: str) -> None:
    """One line on stderr, with every password in it masked (a driver's error text may
    quote a URL, and the configured graph password is masked wherever it appears)."""
    try:
        secrets = Settings().secrets()
    except Exception:  # settings that do not even parse: mask the URLs alone
        secrets = []
    click.echo(f"error: {redacted(message, secrets)}", err=True)


def _is_settings_error(err: Exception) -> bool:
    """A URL of the settings that its driver cannot take (bad syntax, an unknown scheme).
    Matched against the drivers' own classes only if they are loaded (an error of theirs
    means they are): importing the graph driver here would cost every command 0.3 s."""
    kinds: list[type] = []
    if (sa := sys.modules.get("sqlalchemy.exc")) is not None:
        kinds += [sa.ArgumentError, sa.NoSuchModuleError]
    if (neo := sys.modules.get("neo4j.exceptions")) is not None:
        kinds.append(neo.ConfigurationError)
    return isinstance(err, tuple(kinds))


def _command(ctx: click.Context | None) -> str:
    """The failing command as a user types it (``python -m pipeline.cli`` included)."""
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["moe-pipeline", *reversed(names)])


def main(argv: Sequence[str] | None = None) -> None:
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.exc import OperationalError as SQLError

    # The graph driver logs its own retries and dropped connections; the command says what
    # matters in one line, so those stay out of the terminal (a user's logging config that
    # wants them still gets them: the records propagate).
    logging.getLogger("neo4j").addHandler(logging.NullHandler())
    try:
        cli.main(args=argv, standalone_mode=False)
    # Click's own exceptions first: they are Exceptions too, and the catch-all below let
    # them through as tracebacks (a bad option value, a missing file, Ctrl-C at a prompt).
    except click.exceptions.Abort:
        _error("interrupted")
        sys.exit(130)
    except click.UsageError as err:
        _error(f"{err.format_message()} (see {_command(err.ctx)} --help)")
        sys.exit(err.exit_code)
    except click.ClickException as err:
        _error(err.format_message())
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        _error("interrupted")
        sys.exit(130)
    except PipelineError as err:
        _error(str(err))
        sys.exit(1)
    except SQLError as err:
        _error(f"SQL database unreachable ({Settings().sql_url()}): "
               f"{str(err.orig).strip().splitlines()[0] if err.orig else err}")
        sys.exit(1)
    except BrokerError as err:
        _error(f"broker unreachable ({Settings().broker_url()}): {err}")
        sys.exit(1)
    except Exception as err:
        if not _is_settings_error(err):
            raise
        _error(f"settings: {type(err).__name__}: {err}")
        sys.exit(1)

