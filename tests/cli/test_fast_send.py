"""`spt send` takes a click-free path; its output is the same as the click command's."""

import subprocess
import sys

import pytest


def test_spt_send_imports_no_click(tmp_path):
    code = (
        "import sys\n"
        "sys.argv = ['spt', 'send', 'bob']\n"
        "from spt.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    print(exc.code, 'click' in sys.modules)\n"
    )
    env = {"SPT_HOME": str(tmp_path), "SPT_NO_AUTOSTART": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], input="hi", capture_output=True, text=True, env=env)
    assert result.stdout.split() == ["3", "False"], result.stderr


CASES = [
    ["send", "local"],
    ["send", "local", "--from", "alice"],
    ["send", "--from=alice", "--active-only", "local"],
    ["send", "nobody"],
    ["send", "bad address!"],
    ["send", "local", "--active-only", "--idle-only"],
    ["send", "local", "--json-payload", '{"a": 1}'],
    ["send", "local", "--json-payload", "{nope"],
]


@pytest.mark.slow
@pytest.mark.parametrize("args", CASES, ids=" ".join)
def test_fast_path_and_click_path_print_the_same(spt_nodes, args):
    node = spt_nodes("n")
    node.cli("ready", "local", "--once", "--timeout", "0.1")
    fast = node.cli(*args, input="body")
    slow = node.cli("--debug", *args, input="body")  # a global option: the click command runs
    assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr)


def test_help_still_goes_to_click(spt_nodes):
    result = spt_nodes("n", start=False).cli("send", "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout
