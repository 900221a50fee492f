"""Every command's --help runs: lazy loading hides import errors until a command is used."""

import click
import pytest
from click.testing import CliRunner

from spt.cli import cli


def command_paths(group, prefix=()):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        path = [*prefix, name]
        yield path
        if isinstance(command, click.Group):
            yield from command_paths(command, path)


PATHS = list(command_paths(cli))


def test_the_walk_finds_the_core_commands():
    names = {" ".join(p) for p in PATHS}
    assert {"daemon run", "daemon stop", "daemon status", "node show", "node label set", "plugins list"} <= names


@pytest.mark.parametrize("path", PATHS, ids=" ".join)
def test_help_runs(path):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_version():
    from spt import __version__

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
