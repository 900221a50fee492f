"""The plain commands (`send`, `ring`, `ready`, `whoami`, `node show`, `endpoint list|state`,
`subnet status|create|show-code|join`) take a click-free path that loads only the control-socket
client; their output is the click commands'."""

import os
import re
import subprocess
import sys

import pytest

# What spt itself must not load on the plain path, beyond what the interpreter loads at start:
# click and typing cost more start-up time than the control call (bench/cli_startup.py), and the
# rest belongs to the daemon.
NOT_ON_THE_PLAIN_PATH = (
    "click", "typing", "pathlib", "socket", "platformdirs", "asyncio", "aioquic", "cryptography",
    "nacl", "zeroconf", "spake2", "pluggy", "stevedore", "msgspec", "spt.manager", "spt.core.identity",
)

PROBE = (
    "import sys\n"
    "before = set(sys.modules)\n"
    "sys.argv = ['spt', *sys.argv[1:]]\n"
    "from spt.cli import main\n"
    "try:\n"
    "    main()\n"
    "except SystemExit as exc:\n"
    "    code = exc.code\n"
    "loaded = set(sys.modules) - before\n"
    "print(code, ','.join(sorted(m for m in loaded if any(m == n or m.startswith(n + '.') for n in NOT))) or '-')\n"
)


def probe(args, env):
    code = f"NOT = {NOT_ON_THE_PLAIN_PATH!r}\n" + PROBE
    result = subprocess.run([sys.executable, "-c", code, *args], input="hi", capture_output=True, text=True, env=env)
    return result.stdout.split(), result.stderr


@pytest.mark.parametrize(
    "args", [["send", "bob"], ["ring", "bob"], ["ready", "bob", "--once"], ["node", "show"], ["--json", "whoami"],
             ["endpoint", "list", "--detail"], ["endpoint", "state", "bob", "busy"], ["subnet", "status", "--nodes"],
             ["subnet", "create", "home"], ["subnet", "join", "home", "--code", "123456", "--peer", "h:1"]],
    ids=" ".join,
)
def test_plain_commands_load_only_the_control_client(tmp_path, args):
    env = {"SPT_HOME": str(tmp_path), "SPT_NO_AUTOSTART": "1", "PATH": "/usr/bin:/bin"}
    out, err = probe(args, env)
    # DAEMON_DOWN (ELEVATION_REQUIRED for create and join when not root), and none of the heavy
    # modules loaded on the way. A created subnet's QR code loads qrcode (and typing) after the call.
    refused = "4" if os.geteuid() != 0 and args[:2] in (["subnet", "create"], ["subnet", "join"]) else "3"
    assert out == [refused, "-"], err


def test_the_default_state_folder_needs_no_platformdirs_on_linux(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("the XDG rule is written out for Linux only")
    env = {"HOME": str(tmp_path), "SPT_NO_AUTOSTART": "1", "PATH": "/usr/bin:/bin"}
    out, err = probe(["node", "show"], env)
    assert out == ["3", "-"], err
    assert f"no daemon listens on {tmp_path}/.local/share/spt/spt.sock" in err


def test_a_non_plain_shape_goes_to_click():
    from spt.cli._fast import plain_command

    for args in (["send", "--help"], ["send"], ["send", "a", "b"], ["send", "a", "--from"], ["--debug", "send", "a"],
                 ["node", "show", "x"], ["node", "--json", "show"], ["whoami", "--bogus"], ["send", "a", "--active-only=1"],
                 ["ring", "a", "--timeout", "soon"], ["ready", "a", "b"], ["ready", "--timeout="], ["endpoint"],
                 ["endpoint", "--detail"], ["endpoint", "state", "a", "asleep"], ["endpoint", "state", "a"],
                 ["subnet"], ["subnet", "--nodes"], ["subnet", "status", "a", "b"], ["subnet", "create"],
                 ["subnet", "create", "a", "b"], ["subnet", "create", "a", "-h"], ["subnet", "join", "a", "--peer"],
                 ["subnet", "join", "a", "--timeout", "soon"], ["subnet", "join", "a", "--yes"],
                 ["subnet", "show-code", "a", "b"], ["subnet", "show-code", "--qr"]):
        assert plain_command(args) is None, args
    for args in (["--json", "send", "a", "--from=x", "--idle-only", "--json"], ["ready"], ["ready", "a", "--timeout", "1e1"],
                 ["subnet", "status"], ["subnet", "join", "a", "--peer", "h:1", "--peer=h:2", "--code", "1", "--id=ab"]):
        assert plain_command(args) is not None, args


def test_help_still_goes_to_click(spt_nodes):
    node = spt_nodes("n", start=False)
    for args in (["send", "--help"], ["node", "show", "--help"], ["whoami", "-h"]):
        result = node.cli(*args)
        assert result.returncode == 0 and "Usage:" in result.stdout, args


CASES = [
    ["send", "local"],
    ["send", "local", "--from", "alice"],
    ["send", "--from=alice", "--active-only", "local"],
    ["send", "nobody"],
    ["send", "bad address!"],
    ["send", "local", "--active-only", "--idle-only"],
    ["send", "local", "--json-payload", '{"a": 1}'],
    ["send", "local", "--json-payload", "{nope"],
    ["--json", "send", "local"],
    ["send", "local", "--json"],
    ["ring", "local", "--timeout", "0.3"],
    ["ring", "--timeout=0.3", "local", "--from", "alice", "--json-payload", "[1]"],
    ["ring", "nobody", "--timeout", "0.3"],
    ["ring", "local", "--timeout", "-1"],
    ["ready", "quiet", "--once", "--timeout", "0.2"],
    ["ready", "--once", "quiet", "--timeout=0.2", "--subnet", "nowhere"],
    ["ready", "quiet", "--timeout", "0.2"],
    ["ready"],
    ["ready", "bad id!", "--once"],
    ["node", "show"],
    ["node", "show", "--json"],
    ["--json", "node", "show"],
    ["whoami"],
    ["whoami", "--json"],
    ["--json", "whoami"],
    ["endpoint", "list"],
    ["endpoint", "list", "--detail", "--json"],
    ["--json", "endpoint", "list", "--subnet", "nowhere"],
    ["endpoint", "state", "local", "busy"],
    ["endpoint", "state", "local", "idle"],
    ["endpoint", "state", "nobody", "idle"],
    ["subnet", "status"],
    ["subnet", "status", "--nodes"],
    ["--json", "subnet", "status", "--all"],
    ["subnet", "status", "home", "--json"],
    ["subnet", "status", "nowhere"],
    ["subnet", "create", "home"],
    ["subnet", "create", "bad name!"],
    ["subnet", "create", "home", "--json"],
    ["subnet", "show-code", "nowhere"],
    ["subnet", "show-code", "nowhere", "--no-qr", "--json"],
    ["subnet", "join", "home", "--code", "123456"],
    ["subnet", "join", "elsewhere"],
    ["subnet", "join", "elsewhere", "--code", "12345"],
    ["subnet", "join", "elsewhere", "--code=123456", "--id", "ab", "--timeout", "0.2", "--peer", "127.0.0.1:9"],
]


@pytest.mark.slow
def test_fast_path_and_click_path_print_the_same(spt_nodes):
    node = spt_nodes("n")
    node.cli("ready", "local", "--once", "--timeout", "0.1")
    down = spt_nodes("down", start=False)
    runs = [(node, args, {}) for args in CASES]
    runs += [(node, ["whoami"], {"SPT_AGENT_ID": "local"}), (node, ["--json", "whoami"], {"SPT_AGENT_ID": "local"})]
    runs += [(node, ["endpoint", "list", "--detail"], {"SPT_AGENT_ID": "local"})]
    runs += [(down, args, {}) for args in (["send", "local"], ["node", "show"], ["whoami"], ["endpoint", "list"])]
    runs += [(down, args, {}) for args in (["subnet", "status"], ["subnet", "create", "home"], ["subnet", "show-code"])]
    node.cli("subnet", "create", "home", check=True)
    for target, args, env in runs:
        fast = target.cli(*args, input="body", env=env)
        slow = target.cli("--debug", *args, input="body", env=env)  # a global option: the click command runs
        assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr), args


def _same_shape(text, name):
    """A created subnet's output with what differs between two subnets (name, id, code, seed, QR
    modules) written as placeholders."""
    text = text.replace(name, "NAME")
    text = re.sub(r"id=[0-9a-f]{8}", "id=ID", text)
    text = re.sub(r"(CODE:NAME) \d{6} \d+s", r"\1 CODE Ns", text)
    text = re.sub(r"secret=[A-Z2-7]+", "secret=SEED", text)
    return re.sub(r"^[\u2580\u2584\u2588\xa0 ]+$", lambda m: f"QR{len(m.group(0))}", text, flags=re.M)


def test_a_created_subnet_prints_the_same_on_both_paths(spt_nodes):
    outputs = []
    for name, global_options in (("fast", ()), ("slow", ("--debug",))):
        node = spt_nodes(name)
        node.cli("ready", "homeless", "--once", "--timeout", "0.1")  # a perch made before any subnet: HOMED
        created = node.cli(*global_options, "subnet", "create", name)
        shown = node.cli(*global_options, "subnet", "show-code")
        assert created.returncode == shown.returncode == 0, created.stderr + shown.stderr
        outputs.append([_same_shape(out, name) for out in (created.stdout, created.stderr, shown.stdout, shown.stderr)])
    assert outputs[0] == outputs[1]
    created_out, created_err, shown_out, shown_err = outputs[0]
    code = r"CODE:NAME CODE Ns\notpauth://totp/spt:NAME\?secret=SEED&issuer=spt\n(QR\d+\n){10,}"
    assert re.fullmatch(rf"CREATED:NAME id=ID\n{code}HOMED:homeless NAME\n", created_out), created_out
    assert created_err == "Next: on the new machine, in an elevated terminal, run: spt subnet join NAME\n"
    assert re.fullmatch(code, shown_out) and shown_err == "", shown_out
