"""Plugin commands come from a cached table: a hit loads no plugin, and whatever the table was
derived from (block lists, config, an edited plugin) makes it be built again."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from spt.testing.nodes import installed_plugin

PROBE = (
    "import sys\n"
    "sys.argv = ['spt', *sys.argv[1:]]\n"
    "from spt.cli import main\n"
    "try:\n"
    "    main()\n"
    "except SystemExit as exc:\n"
    "    print('EXIT', exc.code, 'spt.manager' in sys.modules)\n"
)


def spt(home, *args, env=None):
    """(exit code, plugin system built?, output) of `spt ARGS` on the state folder `home`."""
    run_env = {**os.environ, "SPT_HOME": str(home), "SPT_NO_AUTOSTART": "1", **(env or {})}
    for name in ("SPT_DISABLE_PLUGINS", "SPT_DISABLE_PLUGIN_AUTOLOAD"):
        if name not in (env or {}):
            run_env.pop(name, None)
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=run_env,
                            timeout=60)
    *output, last = result.stdout.splitlines() or ["EXIT ? ?"]
    _, code, built = last.split()
    return int(code) if code.isdigit() else code, built == "True", "\n".join(output) + result.stderr


def test_a_warm_table_runs_a_plugin_command_without_loading_any_plugin(tmp_path):
    code, built, out = spt(tmp_path, "rc", "--help")
    assert (code, built) == (0, True) and "Usage: spt rc" in out
    doc = json.loads((tmp_path / "cli-commands.json").read_text())
    assert doc["commands"]["rc"] == ["spt.plugins.rc.cli:rc", "rc"]
    code, built, out = spt(tmp_path, "rc", "--help")
    assert (code, built) == (0, False) and "Usage: spt rc" in out
    code, built, out = spt(tmp_path, "--help")
    assert (code, built) == (0, False) and "rc " in out and "send " in out


def test_blocking_a_plugin_by_env_or_config_is_seen_at_once(tmp_path):
    assert spt(tmp_path, "rc", "--help")[0] == 0
    code, built, out = spt(tmp_path, "rc", "--help", env={"SPT_DISABLE_PLUGINS": "rc"})
    assert (code, built) == (2, True) and "No such command 'rc'" in out
    assert spt(tmp_path, "rc", "--help")[:2] == (0, True)  # built again: the block is gone
    (tmp_path / "config.toml").write_text('[plugins]\ndisabled = ["rc"]\n')
    assert spt(tmp_path, "rc", "--help")[:2] == (2, True)
    assert spt(tmp_path, "rc", "--help")[:2] == (2, False)  # the table without rc is cached


@pytest.fixture
def hello_plugin(tmp_path):
    """An installed distribution whose plugin registers one command, `hello`."""
    return installed_plugin(tmp_path / "site", "hello", {"cli.py": textwrap.dedent("""\
        import click

        @click.command()
        def hello():
            \"\"\"Say hello.\"\"\"
            click.echo("HELLO")
    """)})


def write_plugin(site, command):
    plugin = site / "spt_hello" / "plugin.py"
    plugin.write_text(textwrap.dedent(f"""\
        from spt.hooks import CommandRef, hookimpl

        @hookimpl
        def spt_register_commands(registry):
            registry.add(CommandRef({command!r}, "spt_hello.cli:hello", "Say hello."))
    """))
    stamp = plugin.stat().st_mtime_ns + 2_000_000_000  # an edit a coarse clock still tells apart
    os.utime(plugin, ns=(stamp, stamp))


def test_an_edited_plugin_registers_again(tmp_path, hello_plugin):
    env = {"PYTHONPATH": str(hello_plugin)}
    home = tmp_path / "home"
    home.mkdir()
    write_plugin(hello_plugin, "hello")
    assert spt(home, "hello", env=env)[:2] == (0, True)
    code, built, out = spt(home, "hello", env=env)
    assert (code, built, out.strip()) == (0, False, "HELLO")
    write_plugin(hello_plugin, "greet")
    code, built, out = spt(home, "hello", env=env)
    assert (code, built) == (2, True) and "No such command 'hello'" in out
    code, built, out = spt(home, "greet", env=env)
    assert (code, built, out.strip()) == (0, False, "HELLO")


@pytest.mark.root  # giving the table to another user needs root
def test_a_table_another_user_could_write_is_not_trusted(tmp_path):
    """Under sudo the state folder is the invoking user's: a table they wrote must not choose the
    modules root imports and runs as commands (nor may one in a folder another user owns)."""
    assert spt(tmp_path, "rc", "--help")[:2] == (0, True)
    table = tmp_path / "cli-commands.json"
    doc = json.loads(table.read_text())
    doc["commands"]["planted"] = ["spt.plugins.rc.cli:rc", "rc"]
    table.write_text(json.dumps(doc))
    assert spt(tmp_path, "planted", "--help")[:2] == (0, False)  # ours: trusted, as it should be
    table.write_text(json.dumps(doc))
    os.chown(table, 65534, 65534)
    code, built, out = spt(tmp_path, "planted", "--help")
    assert (code, built) == (2, True) and "No such command 'planted'" in out
    os.chown(table, 0, 0)
    os.chown(tmp_path, 65534, 65534)  # a folder another user owns: they could swap the file
    try:
        code, built, out = spt(tmp_path, "planted", "--help")
        assert (code, built) == (2, True) and "No such command 'planted'" in out
    finally:
        os.chown(tmp_path, 0, 0)
