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


def _example_lines(text):
    """The `spt …` commands shown as examples in a help text (comments and `echo … |` dropped)."""
    import shlex

    for line in text.splitlines():
        line = line.strip().partition("  #")[0].partition("|")[2 if "|" in line else 0].strip()
        words = shlex.split(line) if line.startswith(("spt ", "sudo spt ")) else []
        if words:
            yield words[words.index("spt") + 1:]


def _deepest(words):
    """The command an example runs, as (path, its click command)."""
    command, path = cli, []
    for word in words:
        if not isinstance(command, click.Group) or word.startswith("-"):
            break
        sub = command.get_command(click.Context(command), word)
        if sub is None:
            break
        command, path = sub, [*path, word]
    return path, command


@pytest.mark.parametrize("path", PATHS, ids=" ".join)
def test_every_example_in_a_help_text_runs_a_real_command_with_real_options(path):
    """An example is what a new user types first: its command and options must exist, and a file
    it names must have the name the option's own help gives (`spt update fetch --file`)."""
    shown = CliRunner().invoke(cli, [*path, "--help"]).output
    for words in _example_lines(shown):
        run, command = _deepest(words)
        if not run or run[0] not in {"daemon", "endpoint", "node", "notif", "plugins", "subnet", "file", "relay",
                                     "update", "send", "ring", "ready", "whoami", "how-to", "rc", "doctor"}:
            continue  # a third-party command is its author's
        options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--json"}
        own = words[len(run):words.index("--")] if "--" in words else words[len(run):]  # after --: the hosted command's
        unknown = [w.partition("=")[0] for w in own if w.startswith("--") and w.partition("=")[0] not in options]
        assert unknown == [], f"spt {' '.join(path)} --help shows `spt {' '.join(words)}`: no {unknown}"
        if run == ["update", "fetch"] and "--file" in words:
            assert words[words.index("--file") + 1].endswith(".sptupdate"), words
