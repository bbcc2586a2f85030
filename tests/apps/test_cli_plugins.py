"""Commands from ``torouter.commands`` plugins: how the core adds them, and the layering they keep."""

from __future__ import annotations

import textwrap
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

import typer
from typer.testing import CliRunner

from torouter.cli import COMMAND_PLUGINS, add_plugin_commands

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()

PLUGIN_MODULE = textwrap.dedent('''
    import typer

    def add_greet(app):
        @app.command()
        def greet(name: str = typer.Option("world")):
            """Say hello."""
            typer.echo(f"hello {name}")

    def add_train(app):
        @app.command()
        def train():
            """Would replace the core's train."""
            typer.echo("plugin train")

    def add_broken(app):
        raise RuntimeError("registration exploded")
''')


def plugin(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=COMMAND_PLUGINS)


def core_app() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def train():
        """A core command."""
        typer.echo("core train")

    @app.command()
    def route():
        """Another: with two commands Typer keeps a command group, as the core's CLI is."""

    return app


def test_a_plugin_adds_commands_that_run(tmp_path, monkeypatch):
    (tmp_path / "cli_plugin_ok.py").write_text(PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    app = core_app()
    assert add_plugin_commands(app, [plugin("greet", "cli_plugin_ok:add_greet")]) == ["greet"]
    result = runner.invoke(app, ["greet", "--name", "router"])
    assert result.exit_code == 0 and result.output == "hello router\n"
    assert runner.invoke(app, ["train"]).output == "core train\n"


def test_a_plugin_that_fails_to_load_reports_itself_and_spares_the_rest(tmp_path, monkeypatch):
    (tmp_path / "cli_plugin_mixed.py").write_text(PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    app = core_app()
    added = add_plugin_commands(app, [plugin("missing", "cli_plugin_absent_module:add"),
                                      plugin("broken", "cli_plugin_mixed:add_broken"),
                                      plugin("greet", "cli_plugin_mixed:add_greet")])
    assert added == ["greet"]
    result = runner.invoke(app, ["missing", "--config", "x.yaml"])
    assert result.exit_code == 2
    assert "'missing' command could not be loaded from cli_plugin_absent_module:add" in result.output
    assert "ModuleNotFoundError" in result.output and "pip install -e ." in result.output
    result = runner.invoke(app, ["broken"])
    assert result.exit_code == 2 and "RuntimeError: registration exploded" in result.output
    assert runner.invoke(app, ["greet"]).output == "hello world\n"
    assert runner.invoke(app, ["train"]).output == "core train\n"


def test_a_plugin_cannot_replace_a_core_command(tmp_path, monkeypatch, capsys):
    (tmp_path / "cli_plugin_clash.py").write_text(PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    app = core_app()
    assert add_plugin_commands(app, [plugin("train", "cli_plugin_clash:add_train")]) == []
    assert "cli_plugin_clash:add_train adds a command 'train' that already exists" in capsys.readouterr().err
    assert runner.invoke(app, ["train"]).output == "core train\n"


def test_the_project_declares_serve_and_demo_as_plugins():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][COMMAND_PLUGINS]
    app = typer.Typer()
    added = add_plugin_commands(app, [plugin(name, value) for name, value in declared.items()])
    assert added == ["demo", "serve"]
    result = runner.invoke(app, ["serve", "--help"])
    assert result.exit_code == 0 and "OpenAI-compatible" in result.output
