"""Transfers between real daemons on loopback: big file, many files, QUIC path, cancel."""

from __future__ import annotations

import os
import random
import shutil

import pytest
from ft_helpers import file_hash, inbox, make_pair, one, random_file, status, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.root]  # creates subnets (elevated)

MIB = 1 << 20


def sent_tid(result) -> str:
    assert result.returncode == 0, result.stderr
    token, _, tid = result.stdout.strip().partition(":")
    assert token in ("FILE_SENT", "FILE_QUEUED") and len(tid) == 32, result.stdout
    return tid


def test_a_300_mb_file_arrives_intact_and_the_event_says_where(pair, tmp_path):
    a, b = pair
    src = random_file(tmp_path / "big.bin", 300)
    tid = sent_tid(a.cli("file", "send", str(src), "bob", "--wait", "-m", "the <report>", timeout=180))
    digest = file_hash(src)
    try:
        assert file_hash(inbox(b) / tid / "big.bin") == digest
        assert not list((inbox(b) / tid).glob("*.partial"))
        out = one(a, tid)
        assert (out["state"], out["direction"], out["path"], out["done"]) == ("complete", "outgoing", "tcp", 300 * MIB)
        got = one(b, tid)
        assert (got["state"], got["direction"], got["target"]) == ("complete", "incoming", "bob")
        event = b.cli("ready", "bob", "--once", "--timeout", "10").stdout
        assert (
            f'id="{tid}" name="big.bin" size="{300 * MIB}" files="1" hash="blake3:{digest}" '
            f'path="inbox/{tid}/big.bin">the &lt;report&gt;</EVENT>'
        ) in event
        assert event.startswith('<EVENT type="file" from="')
    finally:
        shutil.rmtree(inbox(b) / tid, ignore_errors=True)


def test_a_folder_of_1000_small_files_arrives_intact(pair, tmp_path):
    a, b = pair
    rng = random.Random(7)
    top = tmp_path / "photos"
    sources = {}
    for i in range(1000):
        rel = f"set{i % 10}/day{i % 7}/img{i:04}.raw" if i % 3 else f"img{i:04}.raw"
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(rng.choice([0, 1, 100, 4096, 20_000, 70_000])))
        sources[rel] = path
    tid = sent_tid(a.cli("file", "send", str(top), "bob", "--wait", timeout=180))
    try:
        landed = inbox(b) / tid / "photos"
        for rel, path in sources.items():
            assert file_hash(landed / rel) == file_hash(path), rel
        assert sum(1 for p in landed.rglob("*") if p.is_file()) == 1000
        event = b.cli("ready", "bob", "--once", "--timeout", "10").stdout
        assert 'name="photos"' in event and 'files="1000"' in event and f'path="inbox/{tid}/photos"' in event
    finally:
        shutil.rmtree(inbox(b) / tid, ignore_errors=True)


def test_refusals_at_the_sender(pair, tmp_path):
    a, _ = pair
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "link").symlink_to("/etc/passwd")
    refused = a.cli("file", "send", str(tmp_path / "d"), "bob")
    assert refused.returncode == 1 and refused.stderr.startswith(f"FILE_UNREADABLE:{tmp_path / 'd' / 'link'} ")
    missing = a.cli("file", "send", str(tmp_path / "nope"), "bob")
    assert missing.returncode == 1 and missing.stderr.startswith("FILE_UNREADABLE:")
    (tmp_path / "f").write_text("x")
    nobody = a.cli("file", "send", str(tmp_path / "f"), "nobody")
    assert nobody.returncode == 1 and nobody.stderr.startswith("NO_PERCH:nobody")
    assert a.cli("file", "status", "0" * 32).returncode == 1


def test_the_quic_path_carries_chunks_and_a_cancel_deletes_partial_data(spt_nodes, tmp_path):
    a, b = make_pair(spt_nodes, a_env={"SPT_FILE_DATA_PATH": "quic", "SPT_FILE_MAX_RATE": str(4 * MIB)})
    small = random_file(tmp_path / "small.bin", 3)
    tid = sent_tid(a.cli("file", "send", str(small), "bob", "--wait", timeout=60))
    assert one(a, tid)["path"] == "quic" and one(b, tid)["path"] == "quic"
    assert file_hash(inbox(b) / tid / "small.bin") == file_hash(small)

    big = random_file(tmp_path / "big.bin", 40)
    tid = sent_tid(a.cli("file", "send", str(big), "bob"))
    wait_for(lambda: one(b, tid).get("done", 0) >= 4 * MIB, what="some data at the receiver")
    assert (inbox(b) / tid / "big.bin.partial").exists()
    cancelled = a.cli("file", "cancel", tid)
    assert (cancelled.returncode, cancelled.stdout) == (0, f"FILE_CANCELLED:{tid}\n")
    wait_for(lambda: one(b, tid).get("state") == "cancelled", what="the receiver to hear of the cancel")
    assert not (inbox(b) / tid).exists()
    assert one(a, tid)["state"] == "cancelled"
    assert [t["id"] for t in status(a) if t["state"] == "transferring"] == []


def test_a_source_changed_after_the_offer_fails_with_the_reason_and_never_lands(spt_nodes, tmp_path):
    """The first round on the TCP path sends without hashing at the sender (the receiver verifies
    every chunk): chunks of a source changed since the offer are refused there, and the round
    that resends them checks the source and ends the transfer, saying why."""
    a, b = make_pair(spt_nodes, a_env={"SPT_FILE_MAX_RATE": str(2 * MIB)})
    src = random_file(tmp_path / "moving.bin", 6)
    tid = sent_tid(a.cli("file", "send", str(src), "bob"))  # offered: the manifest is fixed
    with open(src, "r+b") as fh:  # same size, other bytes in the last two chunks (sent after 2 s)
        fh.seek(4 * MIB)
        fh.write(os.urandom(2 * MIB))
    failed = wait_for(lambda: (t := one(a, tid)).get("state") == "failed" and t, timeout=60, what="the sender to fail")
    assert "changed since it was offered" in failed["reason"] and failed["path"] == "tcp"
    assert one(b, tid)["done"] <= 4 * MIB  # the changed chunks were never taken as verified
    assert not (inbox(b) / tid / "moving.bin").exists()
