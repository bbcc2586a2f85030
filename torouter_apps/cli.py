"""The ``torouter serve`` and ``torouter demo`` commands, plugged into the core's command line.

``pyproject.toml`` lists each function below in the ``torouter.commands`` entry-point
group; ``torouter.cli`` calls it with its Typer app when the command line starts. The
core thus offers these commands without importing this package, which is built on the
LangChain adapter. This module imports only Typer: a missing ``serve`` extra is reported
when ``torouter serve`` runs, not as a plugin that failed to load.
"""

from __future__ import annotations

from pathlib import Path

import typer


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def add_serve_command(app: typer.Typer) -> None:
    """Add ``torouter serve``: the router as an OpenAI-compatible endpoint."""

    @app.command()
    def serve(
        config: Path = typer.Option(..., help="Server config (YAML): router, experts, costs, auth and limits."),
        host: str = typer.Option("127.0.0.1", help="Interface to listen on (127.0.0.1: this machine only)."),
        port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
        log_level: str = typer.Option("info", help="critical, error, warning, info or debug."),
        graceful_timeout: float = typer.Option(30.0, min=0.0, help="Seconds in-flight requests get to finish "
                                                                     "on shutdown (SIGINT/SIGTERM)."),
    ):
        """Serve the router as an OpenAI-compatible endpoint (/v1/chat/completions, /v1/models)."""
        try:
            import uvicorn  # noqa: F401 - checked here so a missing extra fails before any work

            from .serve import ConfigError, create_app, run_server
        except ImportError as exc:
            _fail(f"torouter serve needs FastAPI and uvicorn: pip install 'torouter[serve]' ({exc})")
        if log_level.lower() not in ("critical", "error", "warning", "info", "debug"):
            _fail(f"--log-level must be critical, error, warning, info or debug, not {log_level!r}")
        try:
            server_app = create_app(config)  # builds every expert and loads the router before listening
        except ConfigError as exc:
            _fail(str(exc))
        run_server(server_app, host, port, log_level=log_level.lower(), timeout_graceful_shutdown=graceful_timeout)


def add_demo_command(app: typer.Typer) -> None:
    """Add ``torouter demo``: the whole pipeline offline, from local experts' answers to a routed chain."""

    @app.command()
    def demo(
        out: Path = typer.Option(Path("runs/demo"), help="Folder for the data, routers, reports and plots."),
        bert_epochs: int = typer.Option(6, min=1, help="Fine-tuning epochs of the BERT router."),
    ):
        """The whole pipeline offline: local experts answer, BERTScore, MLP and BERT routers, eval, a chain."""
        from .demo import run_demo

        run_demo(out, bert_epochs=bert_epochs)


__all__ = ["add_demo_command", "add_serve_command"]
