"""What a command tells the person running it on stderr: progress bars (on a terminal only:
piped or logged, a command prints its result lines and nothing else, where click's bar would
still print its label), and the embedded graph server it is about to start."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import click


class _Silent:
    def update(self, n: int, *_: Any) -> None:
        pass


@contextlib.contextmanager
def progress(length: int, label: str) -> Iterator[Any]:
    """A bar with ``update(n)`` on stderr when it is a terminal, else one that shows nothing."""
    if not sys.stderr.isatty():
        yield _Silent()
        return
    with click.progressbar(length=length, label=label, file=sys.stderr) as bar:
        yield bar


def note_server_start(settings: Any) -> None:
    """Say so on stderr when this command is about to start the embedded graph server."""
    from pipeline.storage.embedded import LocalGraphServer

    if not settings.neo4j_uri and LocalGraphServer(settings.state_dir).running() is None:
        click.echo(f"starting the embedded graph server of {settings.state_dir.resolve()} "
                   "(it keeps running for later commands; `moe-pipeline down` stops it)",
                   err=True)
