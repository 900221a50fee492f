"""Helpers for the self-update tests: test release keys, tiny releases, a source folder.

The tests never see a production key: each run makes its own primary and recovery keys and
points the nodes at them with `SPT_UPDATE_TEST_KEYS` (a file of public keys, read only when set).
"""

from __future__ import annotations

import io
import json
import tarfile
import time
import zipfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from spt_selfupdate.release import make_artifact, public_hex, publish
from spt_selfupdate.trust import TEST_KEYS_ENV


class TestKeys:
    """A primary, a recovery key, a successor primary and a stranger's key."""

    __test__ = False

    def __init__(self, folder: Path) -> None:
        self.primary = Ed25519PrivateKey.generate()
        self.recovery = Ed25519PrivateKey.generate()
        self.next_primary = Ed25519PrivateKey.generate()
        self.stranger = Ed25519PrivateKey.generate()
        self.file = folder / "trusted-keys.json"
        self.file.write_text(json.dumps({"primary": public_hex(self.primary), "recovery": public_hex(self.recovery)}))

    @property
    def env(self) -> dict[str, str]:
        return {TEST_KEYS_ENV: str(self.file)}


def fake_wheel(version: str, name: str = "spt") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{name}/__init__.py", f'__version__ = "{version}"\n')
    return buf.getvalue()


def tiny_artifact(folder: Path, version: str) -> Path:
    """An artifact that passes every check but is not installable: for fetch and staging tests."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"spt-{version}-py3-none-any.whl"
    wheel.write_bytes(fake_wheel(version))
    dep = folder / "tinydep-1.0-py3-none-any.whl"
    dep.write_bytes(fake_wheel("1.0", "tinydep") + bytes(range(256)) * 64)
    return make_artifact([wheel, dep], folder / f"artifact-{version}.tar")


def tiny_release(source: Path, version: str, key: Ed25519PrivateKey, *, rotate_primary: str | None = None) -> Path:
    """Publish a tiny release of `version` signed by `key` into the source folder `source`."""
    work = source.parent / f"work-{version}-{time.monotonic_ns()}"
    return publish(source, version, tiny_artifact(work, version), key, notes=f"test {version}",
                   rotate_primary=rotate_primary)


def truncate(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()
