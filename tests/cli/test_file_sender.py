"""A received file's `from` leads back to its sender (SPEC.md §3.4), as a message's does: the
receiving agent answers it with a plain `spt send <from>`."""

import re

import pytest

pytestmark = pytest.mark.slow


def file_event_from(node, perch):
    delivered = node.cli("ready", perch, "--once", "--timeout", "20", check=True).stdout
    found = re.search(r'<EVENT type="file" from="([^"]+)"', delivered)
    assert found, delivered
    return found.group(1)


def test_a_file_sent_without_an_identity_or_from_a_new_one_can_be_answered(spt_nodes, tmp_path):
    alpha, beta = spt_nodes.subnet(["alpha", "beta"])
    alpha.cli("ready", "inbox", "--once", "--timeout", "0", check=True)
    beta.wait_listed("inbox")
    note = tmp_path / "note.txt"
    note.write_text("for you")

    # no --from, no SPT_AGENT_ID: a transient identity, as `spt send` gives (was from="home:spt@beta")
    beta.cli("file", "send", str(note), "inbox", "--wait", check=True)
    sender = file_event_from(alpha, "inbox")
    assert "tmp." in sender, sender
    answered = alpha.cli("send", sender, input="thanks")
    assert answered.returncode == 0 and answered.stdout in (f"SENT:{sender}\n", f"QUEUED:{sender}\n"), answered.stderr

    # --from an id with no perch on beta yet: it gets one, and the answer waits for it there
    beta.cli("file", "send", str(note), "inbox", "--from", "writer", "--wait", check=True)
    sender = file_event_from(alpha, "inbox")
    assert sender.split("@")[0].split(":")[-1] == "writer", sender
    answered = alpha.cli("send", sender, input="got it")
    assert answered.returncode == 0, answered.stderr
    held = beta.cli("ready", "writer", "--once", "--timeout", "20", check=True).stdout
    assert held.endswith(">got it</EVENT>\n"), held
