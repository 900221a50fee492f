"""The CLI contract agents and scripts rely on (SPEC.md §3.1, §3.7, §3.10), on one real node.

`--json` parity over every read and status command, the command shapes an existing agent
adapter runs verbatim, refusal lines that explain themselves, and `null` for absent values.
"""

import json

import pytest

from spt.testing.nodes import NodeFactory

pytestmark = pytest.mark.slow

# SPEC.md §3.1: every read and status command, with arguments that make it print a document.
READ_COMMANDS = [
    ["subnet", "status"],
    ["subnet", "status", "--nodes"],
    ["endpoint", "list"],
    ["endpoint", "description", "show", "me"],
    ["endpoint", "visibility", "list", "me"],
    ["endpoint", "sync-scope", "list", "me"],
    ["endpoint", "mind", "me"],
    ["whoami"],
    ["how-to"],
    ["how-to", "send"],
    ["notif", "list"],
    ["file", "status"],
    ["file", "list"],
    ["update", "status"],
    ["daemon", "status"],
    ["node", "show"],
    ["node", "trust", "list"],
    pytest.param(["relay", "list"], marks=pytest.mark.relay),
    ["plugins", "list"],
    ["doctor"],
]
VOLATILE = {"uptime_s"}  # changes between two calls by nature


@pytest.fixture(scope="module")
def node():
    factory = NodeFactory()
    try:
        n = factory("c", env={"SPT_AGENT_ID": "me"})
        n.cli("ready", "me", "--once", "--timeout", "0", check=True)
        n.cli("endpoint", "description", "set", "me", "answers questions", check=True)
        n.cli("ready", "bare", "--once", "--timeout", "0", check=True)
        yield n
    finally:
        factory.close()


def _strip(doc):
    if isinstance(doc, dict):
        return {k: _strip(v) for k, v in doc.items() if k not in VOLATILE}
    if isinstance(doc, list):
        return [_strip(v) for v in doc]
    return doc


@pytest.mark.parametrize("args", READ_COMMANDS, ids=" ".join)
def test_json_before_and_after_the_verb_prints_the_same_document(node, args):
    path = args[:1] if args[0] in ("whoami", "how-to", "doctor") else args[:2]
    helped = node.cli(*path, "--help")
    if helped.returncode != 0 or f"Usage: spt {' '.join(path)}" not in helped.stdout:
        pytest.skip(f"`spt {' '.join(path)}` is not built yet")
    before = node.cli("--json", *args)
    after = node.cli(*args, "--json")
    assert after.returncode == before.returncode, after.stderr
    assert before.returncode in (0, 1), before.stderr  # doctor exits 1 when a check fails
    assert _strip(json.loads(after.stdout)) == _strip(json.loads(before.stdout))


@pytest.mark.parametrize("args", [["endpoint", "stop", "me"], ["endpoint", "state", "me", "idle"]], ids=" ".join)
def test_action_commands_ignore_json_in_either_position(node, args):
    plain = node.cli(*args)
    assert node.cli("--json", *args).stdout == plain.stdout == node.cli(*args, "--json").stdout
    assert plain.stdout.endswith(":me\n") or plain.stdout.endswith("idle\n")


def test_send_ignores_json_after_the_verb(node):
    sent = node.cli("send", "me", "--json", input="x")
    assert sent.returncode == 0 and sent.stdout == "QUEUED:me\n"


# --- the command shapes an agent adapter runs verbatim ----------------------------------------


def test_adapter_command_shapes(spt_nodes):
    n = spt_nodes("a")
    # `spt whoami --json` and `.self.id`; null without a perch (no SPT_AGENT_ID)
    assert json.loads(n.cli("whoami", "--json").stdout)["self"] is None
    me = json.loads(n.cli("whoami", "--json", env={"SPT_AGENT_ID": "agent-1"}).stdout)
    assert me["self"]["id"] == "agent-1"
    # `spt ready <id> --once` creates the perch; the backlog comes next time
    assert n.cli("ready", "agent-1", "--once", "--timeout", "0").stdout == "TIMEOUT\n"
    # `printf … | spt send <t>`
    sent = n.cli("send", "agent-1", input="hello\nworld")
    assert sent.returncode == 0 and sent.stdout == "QUEUED:agent-1\n"
    # `spt send --from <id> <id> --json-payload '{…}'`
    sent = n.cli("send", "--from", "agent-2", "agent-1", "--json-payload", '{"kind": "status", "n": 1}', input="s")
    assert sent.returncode == 0 and sent.stdout == "QUEUED:agent-1\n"
    got = n.cli("ready", "agent-1", "--once")
    assert got.returncode == 0
    lines = got.stdout.splitlines()
    assert lines[0].startswith('<EVENT type="msg" from="tmp.') and lines[0].endswith(">hello<br>world</EVENT>")
    assert lines[1] == '<EVENT type="msg" from="agent-2" json="{&quot;kind&quot;:&quot;status&quot;,&quot;n&quot;:1}">s</EVENT>'
    # the --from sender now has a perch: a reply to it is held, not NO_PERCH
    assert n.cli("send", "agent-2", input="back").stdout == "QUEUED:agent-2\n"
    # `spt ring <t> --timeout 60`, answered by a plain send from the target
    ring = n.popen("ring", "agent-1", "--timeout", "60", "--from", "agent-2", stdin=-1)
    ring.stdin.write("question")
    ring.stdin.close()
    assert ring.stderr.readline() == "QUEUED:agent-1\n"
    asked = n.cli("ready", "agent-1", "--once")
    assert 'ring="1"' in asked.stdout and 'from="agent-2"' in asked.stdout
    assert n.cli("send", "agent-2", "--from", "agent-1", input="answer").returncode == 0
    out = ring.stdout.read()
    assert ring.wait(30) == 0
    assert out.startswith('<EVENT type="msg" from="agent-1" reply_to="') and out.endswith(">answer</EVENT>\n")
    # `spt how-to send|ready|subnet`
    for topic in ("send", "ready", "subnet"):
        shown = n.cli("how-to", topic)
        assert shown.returncode == 0 and "spt" in shown.stdout
    # `spt subnet status`, `spt endpoint list`, `spt endpoint stop <id>`
    assert n.cli("subnet", "status").stdout == "no subnets\n"
    listed = n.cli("endpoint", "list")
    assert listed.returncode == 0 and "  agent-1  active" in listed.stdout
    listener = n.popen("ready", "agent-1")
    assert listener.stderr.readline() == "READY:agent-1\n"
    assert n.cli("endpoint", "stop", "agent-1").stdout == "STOPPED:agent-1\n"
    _, err = listener.communicate(timeout=15)
    assert listener.returncode == 0 and err == "STOPPED:agent-1\n"


# --- refusals explain themselves; absent values are null -------------------------------------


@pytest.mark.parametrize(
    "args",
    [["send", "nobody"], ["send", "x@nonode"], ["send", "x@abcd"], ["endpoint", "stop", "nobody"],
     ["endpoint", "description", "show", "nobody"]],
    ids=" ".join,
)
def test_every_refusal_line_explains_itself(node, args):
    result = node.cli(*args, input="x")
    assert result.returncode == 1
    head, _, explanation = result.stderr.splitlines()[0].partition(" ")
    assert ":" in head and len(explanation) > 10, result.stderr


def test_absent_values_are_null(node):
    local = {p["id"]: p for p in node.json("endpoint", "list")["local"]}
    assert local["bare"]["description"] is None
    assert local["bare"]["home"] is None
    assert local["me"]["description"] == "answers questions"


def test_every_token_raised_without_a_reason_has_a_standing_explanation():
    import re
    from pathlib import Path

    from spt.core.errors import EXPLANATIONS

    root = Path(__file__).resolve().parents[2]
    bare = re.compile(r'(?:Refusal|TokenError)\("([A-Z_]+)", [^,()]+(?:\([^()]*\))?\)')
    tokens = {m for path in [*root.glob("spt/**/*.py"), *root.glob("plugins/*/spt_*/**/*.py")]
              for m in bare.findall(path.read_text())}
    assert tokens and tokens <= set(EXPLANATIONS), tokens - set(EXPLANATIONS)


def test_the_elevation_hint_names_spt_home_only_when_it_is_set(monkeypatch):
    from spt.cli._state import elevated_command

    monkeypatch.delenv("SPT_HOME", raising=False)
    assert "SPT_HOME" not in elevated_command(["subnet", "create", "home"])
    monkeypatch.setenv("SPT_HOME", "/tmp/my node")
    assert elevated_command(["subnet", "create", "home"]).startswith("sudo 'SPT_HOME=/tmp/my node' ")


@pytest.mark.root  # only an elevated spt honours SUDO_USER
def test_under_sudo_the_state_folder_is_the_invoking_users(monkeypatch):
    import pwd

    from spt.core.paths import StatePaths

    user = pwd.getpwuid(65534)
    root_default = StatePaths.resolve({})
    assert StatePaths.resolve({"SUDO_USER": user.pw_name}).root.parts[-3:] == root_default.root.parts[-3:]
    assert str(StatePaths.resolve({"SUDO_USER": user.pw_name}).root).startswith(user.pw_dir)
    assert StatePaths.resolve({"SUDO_USER": user.pw_name, "SPT_HOME": "/x"}).root.as_posix() == "/x"


# --- completion and help ----------------------------------------------------------------------


def _complete(node, words, cword):
    result = node.cli(env={"_SPT_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)})
    return [line.partition(",")[2] for line in result.stdout.splitlines() if line]


def test_completion_offers_endpoint_ids_and_subnet_names(node):
    assert _complete(node, "spt endpoint stop ", 3) == ["bare", "me"]
    assert "me" in _complete(node, "spt send m", 2)
    assert _complete(node, "spt ready b", 2) == ["bare"]
    assert _complete(node, "spt subnet detach ", 3) == []  # no subnets held here: nothing to offer
    assert "stop" in _complete(node, "spt endpoint st", 2)  # verbs still complete


def test_every_group_help_shows_real_examples():
    import click
    from click.testing import CliRunner

    from spt.cli import cli

    def groups(group, prefix=()):
        ctx = click.Context(group)
        yield prefix
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            if isinstance(command, click.Group):
                yield from groups(command, (*prefix, name))

    shipped = {"daemon", "endpoint", "node", "notif", "plugins", "subnet", "file", "relay", "update"}  # third-party groups are theirs
    for path in groups(cli):
        if path and path[0] not in shipped:
            continue
        shown = CliRunner().invoke(cli, [*path, "--help"]).output
        examples = shown.partition("Examples:")[2].splitlines()
        real = [line for line in examples if line.strip().startswith(("spt ", "sudo spt ", "echo "))]
        assert len(real) >= 2, f"spt {' '.join(path)} --help has no examples"


def test_a_bad_value_is_a_usage_error_not_an_answer(node):
    """A typo in an option must not read as an answer: a missing --project folder showed only
    the live tier (as if the project had no entries), a negative join budget said JOIN_NOT_FOUND."""
    for args in (["endpoint", "mind", "me", "--project", "/nonexistent/spt-qa"],
                 ["update", "fetch", "--file", "/nonexistent/spt-qa.sptupdate"]):  # was VERIFY_FAILED:truncated
        missing = node.cli(*args)
        assert (missing.returncode, missing.stdout) == (2, "") and "does not exist" in missing.stderr, missing.stderr
    for global_options in ((), ("--debug",)):  # the plain path, then click
        joined = node.cli(*global_options, "subnet", "join", "home", "--code", "123456", "--timeout", "-1")
        assert (joined.returncode, joined.stdout) == (2, ""), joined.stderr
        assert joined.stderr == "BAD_USAGE:-1.0 --timeout is a number of seconds\n"
        not_hex = node.cli(*global_options, "subnet", "join", "home", "--code", "123456", "--id", "zz", "--timeout", "0.2")
        assert (not_hex.returncode, not_hex.stdout) == (2, ""), not_hex.stderr
        assert not_hex.stderr.startswith("BAD_USAGE:zz --id is a hex prefix"), not_hex.stderr
        # NaN is no number of seconds either: ring and ready took it (nan < 0 is false) and the
        # daemon's event loop got a timer at NaN, which misorders its other timers
        for args in (["ring", "me"], ["ready", "me", "--once"], ["subnet", "join", "home", "--code", "123456"]):
            for value in ("-1", "nan"):
                bad = node.cli(*global_options, *args, "--timeout", value, input="hi")
                assert (bad.returncode, bad.stdout) == (2, ""), (args, value, bad.stderr)
                assert bad.stderr.endswith(" --timeout is a number of seconds\n"), (args, value, bad.stderr)


def test_empty_human_lists_say_so_and_show_nodes_in_display_form(node, tmp_path):
    """A human list that prints nothing reads as a hang or a failure; and every human view shows
    a node as LABEL (xxxxxxxx…) (SPEC.md §2.1)."""
    assert node.cli("notif", "list", check=True).stdout == "(no unread notifications; --all adds acknowledged ones)\n"
    assert node.cli("file", "list", check=True).stdout == "(no transfers in progress; --all adds those of the last 7 days)\n"
    assert node.json("notif", "list") == {"notifications": []}  # JSON stays the document
    note = tmp_path / "note.txt"
    note.write_text("hi")
    tid = node.cli("file", "send", str(note), "me", "--wait", check=True).stdout.strip().split(":")[1]
    me = node.json("node", "show")
    row = next(line for line in node.cli("file", "list", "--all", check=True).stdout.splitlines() if line.startswith(tid))
    assert f"  {me['label']} ({me['key'][:8]}\u2026)  note.txt" in row, row
