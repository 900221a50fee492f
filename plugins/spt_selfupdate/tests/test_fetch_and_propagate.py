"""Fetching, refusing and passing on releases between real daemons on loopback.

alpha fetches from a source folder; beta and gamma have no source at all and stage the release
from alpha through presence and member requests, each verifying it with its own keys. Bad
releases (tampered, unknown key, older, truncated) are refused with their reason and nothing is
staged; a member that offers tampered bytes is refused by the node that fetches them.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import threading
import time

import pytest
from spt_selfupdate.release import public_hex
from spt_selfupdate.service import PARTIAL_FROM
from spt_selfupdate.state import UpdateState
from spt_selfupdate.trust import TrustedKeys, platform_tag
from su_helpers import flip_byte, tiny_release, truncate

from spt.testing.nodes import DEFAULT_CONFIG, Node, NodeFactory, fresh_code
from spt.testing.wait import wait_for

pytestmark = pytest.mark.slow

FAST = DEFAULT_CONFIG + "\n[timing]\npresence_interval = 0.5\n\n[update]\npeer_interval = 0.5\n"


def status(node: Node) -> dict:
    return json.loads(node.cli("update", "status", "--json", check=True).stdout)


def staged_version(node: Node) -> str | None:
    staged = status(node)["staged"]
    return staged["version"] if staged else None


def has_staged(node: Node, version: str) -> bool:
    """Cheap to poll (no CLI): the staged folder appears by one rename, after verification."""
    return (node.home / "selfupdate" / "staged" / version).is_dir()


def staged_files(node: Node) -> list[str]:
    return sorted(p.name for p in (node.home / "selfupdate" / "staged").iterdir())


def refused(node: Node, reason: str, *args: str) -> None:
    result = node.cli("update", "fetch", *args)
    assert result.returncode == 1, result
    assert result.stderr.startswith(f"VERIFY_FAILED:{reason}"), result.stderr
    assert result.stdout == ""


@pytest.fixture(scope="module")
def trio(test_keys):
    factory = NodeFactory()
    try:
        nodes = [factory(n, label=n, config=FAST, env=test_keys.env) for n in ("alpha", "beta", "gamma")]
        nodes[0].cli("subnet", "create", "home", check=True)
        for node in nodes[1:]:
            node.cli("subnet", "join", "home", "--code", fresh_code(nodes[0], "home"), "--peer", nodes[0].address, check=True)
        yield nodes
    finally:
        factory.close()


@pytest.mark.relay  # `fetch --from` a source: the air-gapped build takes --file bundles only
def test_bad_releases_are_refused_and_nothing_is_staged(trio, test_keys, tmp_path):
    alpha = trio[0]
    tampered = tiny_release(tmp_path / "tampered", "0.1.2", test_keys.primary)
    flip_byte(tampered / f"spt-0.1.2-{platform_tag()}.tar", 700)
    refused(alpha, "digest-mismatch", "--from", str(tmp_path / "tampered"))
    tiny_release(tmp_path / "stranger", "0.1.2", test_keys.stranger)
    refused(alpha, "unknown-key", "--from", str(tmp_path / "stranger"))
    tiny_release(tmp_path / "older", "0.0.9", test_keys.primary)
    refused(alpha, "rollback", "--from", str(tmp_path / "older"))
    cut = tiny_release(tmp_path / "cut", "0.1.2", test_keys.primary) / "spt-0.1.2.sptupdate"
    truncate(cut, cut.stat().st_size // 2)
    refused(alpha, "truncated", "--file", str(cut))
    assert staged_version(alpha) is None
    assert staged_files(alpha) == []
    assert list((alpha.home / "selfupdate" / "incoming").iterdir()) == []
    same = tiny_release(tmp_path / "same", "0.1.0", test_keys.primary)
    result = alpha.cli("update", "fetch", "--file", str(same / "spt-0.1.0.sptupdate"), check=True)
    assert result.stdout == "UP_TO_DATE:0.1.0\n"


@pytest.mark.relay  # `fetch --from` a source: the air-gapped build takes --file bundles only
def test_members_without_a_source_stage_from_a_member(trio, test_keys, tmp_path):
    alpha, beta, gamma = trio
    release = tiny_release(tmp_path / "src", "0.1.1", test_keys.primary)
    # gamma already holds the first half of the artifact (a transfer cut earlier): it resumes
    artifact = release / f"spt-0.1.1-{platform_tag()}.tar"
    partial = gamma.home / "selfupdate" / "incoming" / "0.1.1-member" / artifact.name
    partial.parent.mkdir(parents=True)
    half = artifact.stat().st_size // 2
    partial.write_bytes(artifact.read_bytes()[:half])
    (partial.parent / PARTIAL_FROM).write_text(alpha.key)  # the bytes came from alpha
    started = time.monotonic()
    result = alpha.cli("update", "fetch", "--from", str(tmp_path / "src"), check=True)
    assert result.stdout == "STAGED:0.1.1\n"
    for node in (beta, gamma):
        wait_for(lambda n=node: has_staged(n, "0.1.1"), what=f"{node.name} to stage 0.1.1")
    print(f"propagated to two members in {time.monotonic() - started:.1f} s")
    doc = status(gamma)
    staged = doc["staged"]
    # from alpha, or from beta once beta had it: any member that has it
    assert staged["signed_by"] == "primary" and staged["source"].startswith(("alpha (", "beta (")), staged
    assert doc["source"] is None  # it had no source of its own
    assert "release staged" in gamma.log() and "release staged" in beta.log()
    # gamma resumes only from alpha, who sent its partial; from beta it would start over
    first = next(line for line in gamma.log().splitlines() if "fetching a member's release" in line)
    assert f"resume_from={half if f'peer={alpha.key[:8]}' in first else 0} " in first, first
    assert "resume_from=0 " in beta.log()
    text = beta.cli("update", "status", check=True).stdout.splitlines()
    assert text[0] == "CURRENT: 0.1.0"
    assert text[1].startswith("STAGED: 0.1.1 (primary, from ") and "beta (" not in text[1], text
    assert text[2:] == ["POLICY: consent", "SOURCE: none"]
    # The consent notification is recorded on each node that staged.
    assert "update-consent" in gamma.log() or gamma.json("daemon", "status")["unread"] >= 1


@pytest.mark.relay  # `fetch --from` a source: the air-gapped build takes --file bundles only
def test_a_member_offering_tampered_bytes_is_refused(trio, test_keys, tmp_path):
    alpha, beta, gamma = trio
    gamma.stop()
    tiny_release(tmp_path / "src2", "0.1.2", test_keys.primary)
    assert alpha.cli("update", "fetch", "--from", str(tmp_path / "src2"), check=True).stdout == "STAGED:0.1.2\n"
    wait_for(lambda: has_staged(beta, "0.1.2"), what="beta to stage 0.1.2")
    for node in (alpha, beta):  # both offerers now hold corrupted bytes under a valid manifest
        flip_byte(node.home / "selfupdate" / "staged" / "0.1.2" / f"spt-0.1.2-{platform_tag()}.tar", 900)
    gamma.start()
    wait_for(lambda: gamma.log().count("a member's release was refused") >= 2, what="gamma to refuse both offers")
    assert "reason=digest-mismatch" in gamma.log()
    assert staged_version(gamma) == "0.1.1"
    assert staged_files(gamma) == ["0.1.1"]


def test_a_member_that_missed_a_key_rotation_learns_it_from_the_offer(trio, test_keys, tmp_path):
    alpha, beta, _ = trio
    beta.stop()  # beta misses the rotation release 0.1.3
    new = public_hex(test_keys.next_primary)
    rot = tiny_release(tmp_path / "rot", "0.1.3", test_keys.recovery, rotate_primary=new)
    assert alpha.cli("update", "fetch", "--file", str(rot / "spt-0.1.3.sptupdate"), check=True).stdout == "STAGED:0.1.3\n"
    good = tiny_release(tmp_path / "good", "0.1.4", test_keys.next_primary)
    assert alpha.cli("update", "fetch", "--file", str(good / "spt-0.1.4.sptupdate"), check=True).stdout == "STAGED:0.1.4\n"
    beta.start()  # offered only 0.1.4, signed by a primary beta has never trusted, with the rotation
    wait_for(lambda: has_staged(beta, "0.1.4"), what="beta to stage 0.1.4")
    assert "release key rotated by the recovery key" in beta.log()
    old = tiny_release(tmp_path / "old", "0.1.5", test_keys.primary)
    refused(beta, "revoked-key", "--file", str(old / "spt-0.1.5.sptupdate"))


def test_a_replayed_old_rotation_does_not_bring_back_a_retired_primary(spt_nodes, test_keys, tmp_path):
    """The attacker kept a genuine, older recovery-signed rotation (0.0.9, to the primary K1 that
    was later retired) and offers it with a K1-signed release to a node whose build embeds the
    successor primary K2 and has stored no rotation. The node refuses both."""
    k2_build = tmp_path / "k2-build.json"
    k2_build.write_text(json.dumps({"primary": public_hex(test_keys.next_primary),
                                    "recovery": public_hex(test_keys.recovery)}))
    mallory = spt_nodes("mallory", label="mallory", config=FAST, env=test_keys.env, start=False)
    old_rot = tiny_release(tmp_path / "oldrot", "0.0.9", test_keys.recovery, rotate_primary=public_hex(test_keys.primary))
    state = UpdateState(mallory.home)  # mallory's own store: it passes this rotation on with its offer
    k0 = public_hex(test_keys.stranger)
    state.accept_rotation(TrustedKeys(k0, public_hex(test_keys.recovery)), public_hex(test_keys.primary), "0.0.9",
                          (old_rot / "manifest.json").read_bytes(), (old_rot / "manifest.sig").read_bytes())
    state.close()
    mallory.start()
    victim = spt_nodes("victim", label="victim", config=FAST, env={"SPT_UPDATE_TEST_KEYS": str(k2_build)})
    mallory.cli("subnet", "create", "home", check=True)
    victim.cli("subnet", "join", "home", "--code", fresh_code(mallory, "home"), "--peer", mallory.address, check=True)
    bait = tiny_release(tmp_path / "bait", "0.1.1", test_keys.primary)
    assert mallory.cli("update", "fetch", "--file", str(bait / "spt-0.1.1.sptupdate"), check=True).stdout == "STAGED:0.1.1\n"
    wait_for(lambda: "a member's release was refused" in victim.log(), what="victim to refuse mallory's offer")
    log = victim.log()
    assert "a key rotation not newer than this build was ignored" in log, log
    assert "reason=unknown-key" in log and "release key rotated" not in log
    assert staged_version(victim) is None
    refused(victim, "unknown-key", "--file", str(bait / "spt-0.1.1.sptupdate"))  # K1 is still not trusted


def _victim_holding_garbage(spt_nodes, test_keys, tmp_path):
    """mallory offers 0.1.1 but serves 4 KiB of garbage and then nothing; the victim keeps
    that partial (a pause, not a refusal: a member may just have gone away)."""
    mallory, victim = (spt_nodes(n, label=n, config=FAST, env=test_keys.env) for n in ("mallory", "victim"))
    mallory.cli("subnet", "create", "home", check=True)
    victim.cli("subnet", "join", "home", "--code", fresh_code(mallory, "home"), "--peer", mallory.address, check=True)
    victim.stop()  # so it sees only the garbage, never the bytes mallory staged
    release = tiny_release(tmp_path / "src", "0.1.1", test_keys.primary)
    assert mallory.cli("update", "fetch", "--file", str(release / "spt-0.1.1.sptupdate"), check=True).stdout == "STAGED:0.1.1\n"
    served = mallory.home / "selfupdate" / "staged" / "0.1.1" / f"spt-0.1.1-{platform_tag()}.tar"
    served.write_bytes(os.urandom(4096))
    victim.start()
    wait_for(lambda: "fetching a member's release paused" in victim.log(), what="victim to keep mallory's garbage")
    return mallory, victim, release, served


def test_a_member_sending_garbage_then_stopping_does_not_poison_an_honest_download(spt_nodes, test_keys, tmp_path):
    """The honest member's bytes must not be appended to mallory's partial (the digest would
    fail and the honest member be refused): the release stages from the honest member."""
    mallory, victim, release, _ = _victim_holding_garbage(spt_nodes, test_keys, tmp_path)
    honest = spt_nodes("honest", label="honest", config=FAST, env=test_keys.env)
    honest.cli("subnet", "join", "home", "--code", fresh_code(mallory, "home"), "--peer", mallory.address, check=True)
    assert honest.cli("update", "fetch", "--file", str(release / "spt-0.1.1.sptupdate"), check=True).stdout == "STAGED:0.1.1\n"
    wait_for(lambda: has_staged(victim, "0.1.1"), what="victim to stage 0.1.1 from the honest member")
    assert status(victim)["staged"]["source"].startswith("honest ("), status(victim)
    log = victim.log()
    assert f"peer={honest.key[:8]} version=0.1.1 resume_from=0 " in log, log
    assert "a member's release was refused" not in log, log


def test_a_resumed_download_that_fails_its_digest_starts_over_blaming_no_one(spt_nodes, test_keys, tmp_path):
    """The same member later serves the true bytes: the resumed file fails the digest, which
    may be the earlier bytes' fault, so the victim starts over instead of refusing the member."""
    _, victim, release, served = _victim_holding_garbage(spt_nodes, test_keys, tmp_path)
    served.write_bytes((release / served.name).read_bytes())
    wait_for(lambda: has_staged(victim, "0.1.1"), what="victim to start over and stage 0.1.1")
    log = victim.log()
    assert "a resumed download failed (digest-mismatch); starting over" in log, log
    assert "a member's release was refused" not in log, log


def test_plugins_list_shows_the_updater(trio):
    doc = trio[0].json("plugins", "list")
    rec = next(p for p in doc["plugins"] if p["name"] == "selfupdate")
    assert rec["status"] == "ok" and rec["dist"] == "spt-selfupdate"
    assert any("update" in p for p in rec["provides"]) and any("selfupdate" in p for p in rec["provides"])


def test_plugins_list_shows_a_broken_key_set(spt_nodes, tmp_path):
    bad = tmp_path / "keys.json"
    bad.write_text("{}")
    node = spt_nodes("broken", start=False, env={"SPT_UPDATE_TEST_KEYS": str(bad)})
    doc = node.json("plugins", "list")
    rec = next(p for p in doc["plugins"] if p["name"] == "selfupdate")
    assert rec["status"].startswith("failed:") and "primary" in rec["status"], rec


def test_air_gapped_rotation_through_the_recovery_key(spt_nodes, test_keys, tmp_path):
    node = spt_nodes("solo", label="solo", config=FAST, env={**test_keys.env, "SPT_DISABLE_PLUGINS": "relay"})
    tiny_release(tmp_path / "src", "0.1.3", test_keys.primary)
    result = node.cli("update", "fetch", "--from", str(tmp_path / "src"))
    assert result.returncode == 1 and result.stderr.startswith("AIR_GAPPED"), result
    assert node.cli("update", "status", check=True).stdout.splitlines()[3] == "SOURCE: none"

    new = public_hex(test_keys.next_primary)
    rot = tiny_release(tmp_path / "rot", "0.1.3", test_keys.recovery, rotate_primary=new)
    assert node.cli("update", "fetch", "--file", str(rot / "spt-0.1.3.sptupdate"), check=True).stdout == "STAGED:0.1.3\n"
    assert status(node)["staged"]["signed_by"] == "recovery"
    old = tiny_release(tmp_path / "old", "0.1.4", test_keys.primary)
    refused(node, "revoked-key", "--file", str(old / "spt-0.1.4.sptupdate"))
    node.stop()
    node.start()  # the rotation is durable
    refused(node, "revoked-key", "--file", str(old / "spt-0.1.4.sptupdate"))
    good = tiny_release(tmp_path / "good", "0.1.4", test_keys.next_primary)
    assert node.cli("update", "fetch", "--file", str(good / "spt-0.1.4.sptupdate"), check=True).stdout == "STAGED:0.1.4\n"
    assert staged_files(node) == ["0.1.4"]
    assert node.cli("update", "auto", "on", check=True).stdout == "AUTO_UPDATE:on\n"
    assert status(node)["policy"] == "auto"
    assert node.cli("update", "auto", "off", check=True).stdout == "AUTO_UPDATE:off\n"


@pytest.mark.relay  # `fetch --from` a source: the air-gapped build takes --file bundles only
def test_nothing_staged_then_the_periodic_check_stages_from_the_source(spt_nodes, test_keys, tmp_path):
    source = tmp_path / "src"
    config = DEFAULT_CONFIG + f'\n[update]\nsource = "{source}"\ncheck_interval = 1.0\n'
    node = spt_nodes("checker", config=config, env=test_keys.env)
    result = node.cli("update", "apply")
    assert result.returncode == 1 and result.stderr.startswith("NOTHING_STAGED"), result
    tiny_release(source, "0.1.1", test_keys.primary)  # published after the node started
    wait_for(lambda: has_staged(node, "0.1.1"), what="the periodic check to stage 0.1.1")
    assert status(node)["staged"]["source"] == str(source)

    # an http(s) source: a plain web server on loopback serving a source folder
    web = tmp_path / "web"
    tiny_release(web, "0.1.2", test_keys.primary)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(web))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert node.cli("update", "fetch", "--from", url, check=True).stdout == "STAGED:0.1.2\n"
    finally:
        server.shutdown()
        server.server_close()
    assert staged_files(node) == ["0.1.2"]


