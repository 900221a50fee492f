"""`spt how-to` needs no daemon: topics, JSON, and the unknown-topic token."""

import json

import pytest
from click.testing import CliRunner

from spt.cli import cli
from spt.cli._dispatch import run


@pytest.mark.parametrize("topic", ["ready", "send", "ring", "subnet", "file", "mind"])
def test_every_topic_has_guidance(topic):
    result = CliRunner().invoke(cli, ["how-to", topic])
    assert result.exit_code == 0 and len(result.output.splitlines()) >= 3


def test_no_topic_lists_them_and_json_is_one_document():
    listed = CliRunner().invoke(cli, ["how-to"])
    assert all(t in listed.output for t in ("ready", "send", "ring", "subnet", "file", "mind"))
    doc = json.loads(CliRunner().invoke(cli, ["--json", "how-to"]).output)
    assert doc == {"topics": ["ready", "send", "ring", "subnet", "file", "mind"]}
    assert json.loads(CliRunner().invoke(cli, ["how-to", "ring", "--json"]).output)["topic"] == "ring"


def test_an_unknown_topic_is_no_such_topic_exit_2(capsys):
    assert run(cli, ["how-to", "juggling"]) == 2
    assert capsys.readouterr().err.startswith("NO_SUCH_TOPIC:juggling ")


@pytest.mark.parametrize("command", ["send", "ring", "ready"])
def test_agent_commands_stay_light(command, tmp_path):
    """Agents run these per message: no asyncio, crypto, QUIC or plugin machinery."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from spt.cli import cli\n"
        "from spt.cli._dispatch import run\n"
        f"rc = run(cli, [{command!r}, 'bob'])\n"
        "heavy = ('aioquic', 'cryptography', 'zeroconf', 'asyncio', 'stevedore', 'pluggy',"
        " 'spt.core.identity')\n"
        "print(rc, ','.join(m for m in heavy if m in sys.modules))\n"
    )
    env = {**os.environ, "SPT_HOME": str(tmp_path), "SPT_NO_AUTOSTART": "1"}
    argv = [sys.executable, "-c", code]
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
    assert result.stdout.split() == ["3"]  # DAEMON_DOWN, and nothing heavy imported on the way


# What an agent cannot work out from one trial run and must be told: how a big body arrives, what
# a received file looks like, how its listener ends, who it is without --from, and which exit
# codes mean "fix the call" against "a refusal" (SPEC.md §3.2, §3.4, §4.3, §8.5).
MUST_SAY = {
    "ready": ["<EVENT-PART", 'seq="1/n"', 'type="file"', 'path="inbox/', "reply_to=", "json=", "STOPPED:", "SUSPENDED:"],
    "send": ["tmp.", "1 MiB", "BAD_BODY", "Exit 1", "Exit 2", "DAEMON_DOWN", "SPOOL_FULL"],
    "ring": ["--from", "TIMEOUT"],
    "file": ["FILE_SENT:", "FILE_UNREADABLE:", "FILE_REFUSED:", "path="],
}


@pytest.mark.parametrize("topic", sorted(MUST_SAY))
def test_each_topic_tells_an_agent_what_it_must_handle(topic):
    text = CliRunner().invoke(cli, ["how-to", topic]).output
    assert [fact for fact in MUST_SAY[topic] if fact not in text] == []
    assert max(len(line) for line in text.splitlines()) <= 100  # readable in a terminal and a prompt
