"""The service: ``serve`` (the HTTP API and the page) and ``token`` (its bearer tokens)."""

from __future__ import annotations

import click

from pipeline.cli.bounds import Count, Real
from pipeline.cli.progress import note_server_start
from pipeline.settings import Settings


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="the address to listen on (another than loopback exposes the API: every "
                   "route but /health still needs a token)")
@click.option("--port", type=Count(1, 65535), default=8000, show_default=True)
@click.option("--max-body-mb", type=Real(0.0, 65536.0, min_open=True), default=64.0,
              show_default=True,
              help="a request body past this is refused (413)")
@click.pass_obj
def serve(settings: Settings, host: str, port: int, max_body_mb: float) -> None:
    """Serve the HTTP API (OpenAPI at /docs) and the page at /, on the same stages as the
    CLI. Tokens: moe-pipeline token (read), --write (write)."""
    try:
        import uvicorn

        from pipeline.service import create_app
    except ImportError as err:
        raise click.ClickException(f"the serve extra is not installed ({err.name}): "
                                   "pip install 'moe-pipeline[serve]'") from None
    note_server_start(settings)
    app = create_app(settings, max_body_mb)
    click.echo(f"serving on http://{host}:{port}/ (API docs: /docs; a token: "
               "moe-pipeline token)", err=True)
    # No access log: a line per request is noise, and tokens are never in URLs anyway.
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


@click.command()
@click.option("--write", is_flag=True, help="the write token (jobs, write queries, forget)")
@click.option("--revoke", is_flag=True, help="replace the token: the old one stops working")
@click.pass_obj
def token(settings: Settings, write: bool, revoke: bool) -> None:
    """Print the API's read token (or --write token), made on first use and kept in the
    state dir, owner-only."""
    from pipeline import tokens

    click.echo(tokens.token(settings.state_dir, "write" if write else "read", revoke))


COMMANDS = [serve, token]
