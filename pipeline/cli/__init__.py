"""The `moe-pipeline` command line: one group, its commands in four modules.

- `run` — the pipeline: ``run``, ``submit``, ``status``, ``stats``, ``worker``;
- `graph` — questions and the embedded server: ``query``, ``similar``, ``up``, ``down``;
- `model` — the model: ``train``, ``models``, ``demo``, ``generate``;
- `serve` — the service: ``serve``, ``token``.

The group builds `Settings` once and hands it to every command (``ctx.obj``); `main` turns
every `PipelineError` (and an unreachable SQL database or broker, a setting out of its
bounds, a full disk, a file that cannot be written) into one line on stderr and exit status 1;
a bad option value is one line and exit status 2 (the options' bounds: `bounds`). Commands
import what they run inside their bodies: ``--help``, ``status``, ``query`` and ``down`` then
never pay for importing torch.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import click
from pydantic import ValidationError

from pipeline import __version__
from pipeline.cli.bounds import Count
from pipeline.cli.text import printable
from pipeline.errors import PipelineError
from pipeline.redact import redacted
from pipeline.settings import PRIVATE_UMASK, Settings, private_state_dir


@click.group()
@click.version_option(__version__, prog_name="moe-pipeline")
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False),
              help="serve this checkpoint [default: MOE_MODEL_PATH, else the newest trained "
                   "one of the state dir, else the default model]")
@click.option("--max-params", type=Count(1, 10**15), metavar="N",
              help="refuse a model (checkpoint, --config, Llama) of more parameters than N, "
                   "counted before it is built [default: MOE_MAX_PARAMS, else 2e9]")
@click.option("--debug", is_flag=True,
              help="an unexpected error shows its traceback instead of one line")
@click.pass_context
def cli(ctx: click.Context, model_path: str | None, max_params: int | None,
        debug: bool) -> None:
    """moe-pipeline: mixture-of-experts routing, deduplicated insights in a graph."""
    given: dict[str, Any] = {k: v for k, v in (("model_path", model_path),
                                               ("max_params", max_params)) if v}
    ctx.obj = Settings(**given)
    # This process writes the state dir (SQLite and its WAL, checkpoints, the graph server
    # it starts inherits the umask too): private whatever the shell's umask, and a state dir
    # left too open by an earlier release is fixed here, once per command.
    os.umask(PRIVATE_UMASK)
    try:
        private_state_dir(ctx.obj.state_dir)
    except OSError as err:
        raise PipelineError(f"state dir {ctx.obj.state_dir}: {err.strerror or err}") from err


def _register() -> None:
    from pipeline.cli import graph, model, run, serve

    for module in (run, graph, model, serve):
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
    from pipeline.cli.text import printable  # an error may quote an item's id or text

    click.echo(f"error: {printable(redacted(message, secrets))}", err=True)


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


def _settings_line(err: ValidationError) -> str:
    """A setting the environment gave out of bounds, named as the user set it."""
    first = err.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else "?"
    info = Settings.model_fields.get(field)
    choices = getattr(info.validation_alias, "choices", None) if info else None
    name = " or ".join(str(c) for c in choices) if choices else f"MOE_{field.upper()}"
    return f"setting {name}={first.get('input')!r}: {first['msg']}"


def _disk_line(err: OSError) -> str:
    """An OSError a command met writing or reading a file: one line naming the file."""
    where = err.filename or "a file (the state dir, or an output file)"
    if err.errno == errno.ENOSPC:
        return f"disk full writing {where}: no space left on device"
    return f"{where}: {err.strerror or err}"


def _sql_full(err: Exception) -> bool:
    """Whether SQL failed because its disk is full (SQLite's SQLITE_FULL, PostgreSQL's
    disk_full), which the driver reports as an operational error like an outage."""
    orig = getattr(err, "orig", None)
    return (getattr(orig, "sqlite_errorcode", None) == SQLITE_FULL
            or getattr(orig, "sqlstate", None) == PG_DISK_FULL)


def _unexpected_line(err: Exception) -> str:
    """An error no handler above expected, in one line: its kind and first line, and where
    to find the rest. A graph server's own failure on a state dir whose disk is (nearly)
    full is said to be that: the server reports it as an unknown error."""
    first = (str(err).strip().splitlines() or [""])[0][:500]
    if type(err).__module__.startswith("neo4j"):
        try:
            state = Settings().state_dir
            free = shutil.disk_usage(state).free if state.exists() else None
        except Exception:  # settings or the disk unreadable: say only what failed
            free = None
        if free is not None and free < LOW_DISK_BYTES:
            return (f"disk full writing the graph in {state}: {free:,} bytes free "
                    f"(the server said: {printable(first)})")
        return f"graph server error: {printable(first)}"
    return (f"{type(err).__name__}: {printable(first)} (unexpected; run the command again "
            "with --debug for the traceback)")


LOW_DISK_BYTES = 4 << 20  # below this, a graph server's failure is taken for a full disk
SQLITE_FULL = 13  # sqlite3.h
PG_DISK_FULL = "53100"  # PostgreSQL's SQLSTATE class 53, insufficient resources


def main(argv: Sequence[str] | None = None) -> None:
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.exc import OperationalError as SQLError

    # The graph driver logs its own retries and dropped connections; the command says what
    # matters in one line, so those stay out of the terminal (a user's logging config that
    # wants them still gets them: the records propagate).
    logging.getLogger("neo4j").addHandler(logging.NullHandler())
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args[: args.index("--")] if "--" in args else "--debug" in args
    try:
        cli.main(args=args, standalone_mode=False)
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
    except ValidationError as err:  # Settings() in the group: an environment variable
        _error(_settings_line(err))
        sys.exit(1)
    except SQLError as err:
        if _sql_full(err):
            _error(f"disk full writing the SQL database ({Settings().sql_url()})")
            sys.exit(1)
        _error(f"SQL database unreachable ({Settings().sql_url()}): "
               f"{str(err.orig).strip().splitlines()[0] if err.orig else err}")
        sys.exit(1)
    except BrokerError as err:
        _error(f"broker unreachable ({Settings().broker_url()}): {err}")
        sys.exit(1)
    except BrokenPipeError:  # `moe-pipeline query ... | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        sys.exit(141)  # 128 + SIGPIPE, as a shell reports a command ended by it
    except OSError as err:  # a full disk, a missing folder, a file that may not be read
        _error(_disk_line(err))
        sys.exit(1)
    except Exception as err:
        if _is_settings_error(err):
            _error(f"settings: {type(err).__name__}: {err}")
        elif debug:
            raise
        else:
            _error(_unexpected_line(err))
        sys.exit(1)

