"""Every way a release is refused, as an attacker or a broken mirror would produce it.

Each case builds real signed bytes with real keys and asserts the exact `VERIFY_FAILED` reason;
the happy path is checked alongside so that a refusal cannot come from a broken fixture.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spt_selfupdate.bundle import read_bundle
from spt_selfupdate.release import public_hex, sign_manifest
from spt_selfupdate.trust import (
    Artifact,
    TrustedKeys,
    VerifyFailed,
    embedded_keys,
    manifest_document,
    platform_tag,
    sha256_file,
    verify_artifact,
    verify_manifest,
)
from su_helpers import flip_byte, tiny_artifact, tiny_release, truncate

from spt.core.proto.canonical import canonical_bytes

TAG = platform_tag()


@pytest.fixture
def keys(test_keys) -> TrustedKeys:
    return TrustedKeys(public_hex(test_keys.primary), public_hex(test_keys.recovery))


def manifest_for(version: str, art: Path | None = None, **extra) -> bytes:
    size, digest = (art.stat().st_size, sha256_file(art)) if art else (10, "ab" * 32)
    return manifest_document(version, "2026-12-01T00:00:00Z", "n", [Artifact(TAG, "a.tar", size, digest)], **extra)


def refused(reason: str, *args, **kwargs) -> None:
    with pytest.raises(VerifyFailed) as info:
        verify_manifest(*args, **kwargs)
    assert info.value.reason == reason, info.value.status_line()
    assert info.value.status_line().startswith(f"VERIFY_FAILED:{reason}")


def test_a_release_signed_by_the_primary_is_accepted(keys, test_keys):
    m = manifest_for("0.2.0")
    release = verify_manifest(m, sign_manifest(m, test_keys.primary), keys, installed="0.1.0")
    assert (release.version, release.signed_by) == ("0.2.0", "primary")


def test_unknown_key(keys, test_keys):
    m = manifest_for("0.2.0")
    refused("unknown-key", m, sign_manifest(m, test_keys.stranger), keys, installed="0.1.0")


def test_a_changed_manifest_breaks_the_signature(keys, test_keys):
    m = manifest_for("0.2.0")
    sig = sign_manifest(m, test_keys.primary)
    refused("bad-signature", m.replace(b'"0.2.0"', b'"0.9.0"'), sig, keys, installed="0.1.0")
    # a trusted key in the signature document with another key's signature
    other = json.loads(sign_manifest(m, test_keys.stranger))
    forged = canonical_bytes({"key": keys.primary, "sig": other["sig"]})
    refused("bad-signature", m, forged, keys, installed="0.1.0")


def test_malformed_signature_and_manifest(keys, test_keys):
    m = manifest_for("0.2.0")
    refused("malformed-signature", m, b"not json", keys, installed="0.1.0")
    refused("malformed-signature", m, canonical_bytes({"key": keys.primary}), keys, installed="0.1.0")
    pretty = json.dumps(json.loads(m), indent=1).encode()  # signed, but not the canonical form
    refused("malformed-manifest", pretty, sign_manifest(pretty, test_keys.primary), keys, installed="0.1.0")
    bad_version = canonical_bytes({**json.loads(m), "version": "0.2.0rc1"})
    refused("malformed-manifest", bad_version, sign_manifest(bad_version, test_keys.primary), keys, installed="0.1.0")
    no_art = canonical_bytes({**json.loads(m), "artifacts": {}})
    refused("malformed-manifest", no_art, sign_manifest(no_art, test_keys.primary), keys, installed="0.1.0")
    escape = canonical_bytes({**json.loads(m), "artifacts": {TAG: {"file": "../x.tar", "size": 1, "sha256": "ab" * 32}}})
    refused("malformed-manifest", escape, sign_manifest(escape, test_keys.primary), keys, installed="0.1.0")
    other = canonical_bytes({**json.loads(m), "name": "evil"})
    refused("wrong-name", other, sign_manifest(other, test_keys.primary), keys, installed="0.1.0")


def test_rollback_and_up_to_date(keys, test_keys):
    old = manifest_for("0.0.9")
    refused("rollback", old, sign_manifest(old, test_keys.primary), keys, installed="0.1.0")
    same = manifest_for("0.1.0")
    refused("up-to-date", same, sign_manifest(same, test_keys.primary), keys, installed="0.1.0")
    # above the installed version but below one applied here before (a downgraded reinstall)
    mid = manifest_for("0.1.5")
    refused("rollback", mid, sign_manifest(mid, test_keys.primary), keys, installed="0.1.0", highest_applied="0.2.0")


def test_rotation_rules(keys, test_keys):
    new = public_hex(test_keys.next_primary)
    plain = manifest_for("0.2.0")
    refused("recovery-without-rotation", plain, sign_manifest(plain, test_keys.recovery), keys, installed="0.1.0")
    rotating = manifest_for("0.2.0", rotate_primary=new)
    refused("rotation-not-by-recovery", rotating, sign_manifest(rotating, test_keys.primary), keys, installed="0.1.0")
    to_recovery = manifest_for("0.2.0", rotate_primary=keys.recovery)
    refused("bad-rotation", to_recovery, sign_manifest(to_recovery, test_keys.recovery), keys, installed="0.1.0")
    release = verify_manifest(rotating, sign_manifest(rotating, test_keys.recovery), keys, installed="0.1.0")
    assert (release.signed_by, release.rotate_primary) == ("recovery", new)
    after = keys.rotated(new)
    later = manifest_for("0.3.0")
    refused("revoked-key", later, sign_manifest(later, test_keys.primary), after, installed="0.1.0")
    assert verify_manifest(later, sign_manifest(later, test_keys.next_primary), after, installed="0.1.0").signed_by == "primary"
    back = manifest_for("0.3.0", rotate_primary=keys.primary)  # the recovery key cannot bring a revoked key back
    refused("bad-rotation", back, sign_manifest(back, test_keys.recovery), after, installed="0.1.0")


def artifact_case(tmp_path: Path, test_keys, keys: TrustedKeys):
    art = tiny_artifact(tmp_path / "w", "0.2.0")
    m = manifest_for("0.2.0", art)
    return art, verify_manifest(m, sign_manifest(m, test_keys.primary), keys, installed="0.1.0")


def artifact_refused(reason: str, release, path: Path, tag: str = TAG) -> None:
    with pytest.raises(VerifyFailed) as info:
        verify_artifact(release, tag, path)
    assert info.value.reason == reason, info.value.status_line()


def test_artifact_checks(tmp_path, keys, test_keys):
    art, release = artifact_case(tmp_path, test_keys, keys)
    assert "spt-0.2.0-py3-none-any.whl" in verify_artifact(release, TAG, art)
    artifact_refused("no-artifact-for-platform", release, art, tag="py27-plan9-vax")
    artifact_refused("truncated", release, tmp_path / "missing.tar")
    size = art.stat().st_size
    tampered = tmp_path / "tampered.tar"
    tampered.write_bytes(art.read_bytes())
    flip_byte(tampered, size - 5000)
    artifact_refused("digest-mismatch", release, tampered)
    short = tmp_path / "short.tar"
    short.write_bytes(art.read_bytes())
    artifact_refused("truncated", release, truncate(short, size // 2))
    long = tmp_path / "long.tar"
    long.write_bytes(art.read_bytes() + b"\0")
    artifact_refused("size-mismatch", release, long)


def test_an_artifact_must_be_a_flat_tar_of_wheels_with_spt(tmp_path, keys, test_keys):
    for name in ("../evil.whl", "notes.txt"):
        bad = tmp_path / "bad.tar"
        with tarfile.open(bad, "w") as tar:
            src = tmp_path / "x"
            src.write_bytes(b"x")
            tar.add(src, arcname="spt-0.2.0-py3-none-any.whl")
            tar.add(src, arcname=name)
        m = manifest_for("0.2.0", bad)
        release = verify_manifest(m, sign_manifest(m, test_keys.primary), keys, installed="0.1.0")
        artifact_refused("bad-artifact", release, bad)
    nospt = tmp_path / "nospt.tar"
    with tarfile.open(nospt, "w") as tar:
        tar.add(src, arcname="other-1.0-py3-none-any.whl")
    m = manifest_for("0.2.0", nospt)
    artifact_refused("bad-artifact", verify_manifest(m, sign_manifest(m, test_keys.primary), keys, installed="0.1.0"), nospt)


def test_bundles(tmp_path, test_keys):
    release_dir = tiny_release(tmp_path / "src", "0.2.0", test_keys.primary)
    bundle = release_dir / "spt-0.2.0.sptupdate"
    ok = tmp_path / "ok"
    ok.mkdir()
    read_bundle(bundle, ok)
    assert sorted(p.name for p in ok.iterdir()) == sorted(["manifest.json", "manifest.sig", f"spt-0.2.0-{TAG}.tar"])
    with tarfile.open(bundle) as tar:
        last = tar.getmembers()[-1]
    # cut inside a header, inside the artifact's data, and one byte before the artifact's end
    for keep in (100, last.offset_data + last.size // 2, last.offset_data + last.size - 1):
        cut = tmp_path / f"cut-{keep}"
        cut.write_bytes(bundle.read_bytes()[:keep])
        into = tmp_path / f"into-{keep}"
        into.mkdir()
        with pytest.raises(VerifyFailed) as info:
            read_bundle(cut, into)
        assert info.value.reason == "truncated", info.value.status_line()
    nested = tmp_path / "nested.sptupdate"
    with tarfile.open(nested, "w") as tar:
        tar.add(release_dir / "manifest.json", arcname="sub/manifest.json")
    into = tmp_path / "nested"
    into.mkdir()
    with pytest.raises(VerifyFailed) as info:
        read_bundle(nested, into)
    assert info.value.reason == "bad-bundle"


def test_trusted_keys_override_is_checked(tmp_path, test_keys):
    assert embedded_keys({}).primary != public_hex(test_keys.primary)  # the production set by default
    assert embedded_keys(test_keys.env).primary == public_hex(test_keys.primary)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"primary": "00" * 31, "recovery": public_hex(test_keys.recovery)}))
    with pytest.raises(ValueError):
        embedded_keys({"SPT_UPDATE_TEST_KEYS": str(bad)})


# --- fuzz: what members and sources send is decoded only by these; garbage is a clean refusal --

_fuzz_keys = TrustedKeys("11" * 32, "22" * 32)


@settings(max_examples=300, deadline=None)
@given(manifest=st.binary(max_size=400), sig=st.binary(max_size=200))
def test_fuzz_manifest_and_signature_bytes(manifest, sig):
    with pytest.raises(VerifyFailed):
        verify_manifest(manifest, sig, _fuzz_keys, installed="0.1.0")


@settings(max_examples=200, deadline=None)
@given(doc=st.dictionaries(st.sampled_from(["name", "version", "time", "notes", "artifacts", "rotate_primary", "x"]),
                           st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                                        max_leaves=8)))
def test_fuzz_signed_manifest_shapes(doc, test_keys):
    keys = TrustedKeys(public_hex(test_keys.primary), public_hex(test_keys.recovery))
    m = canonical_bytes(doc)
    with contextlib.suppress(VerifyFailed):  # a refusal is fine; anything else escaping is the bug
        verify_manifest(m, sign_manifest(m, test_keys.primary), keys, installed="0.1.0")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3000))
def test_fuzz_bundle_bytes(data, tmp_path):
    path = tmp_path / "fuzz.sptupdate"
    path.write_bytes(data)
    into = tmp_path / "fuzz-into"
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir()
    with pytest.raises(VerifyFailed):
        read_bundle(path, into)
