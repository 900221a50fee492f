"""The maintainer's release tool: `python -m spt_selfupdate.release …`.

    keygen  --out FILE                      a new Ed25519 release key (0600 JSON; keep it offline)
    build   --version V --key FILE --out DIR [--checkout DIR] [--deps pip|installed]
            [--notes TEXT] [--without DIST]… [--rotate-primary HEX]

`build` makes wheels of spt and its plugin distributions from the checkout at version V (the
versions and the `spt==` pins rewritten in a copy of the tree), adds a wheel of every
dependency, packs them into this platform's artifact (a tar of wheels), signs the manifest and
publishes it into DIR, which then serves as an update source (`spt update fetch --from DIR`),
with `DIR/V/spt-V.sptupdate` as the offline bundle for air-gapped sites (`--file`).

Dependency wheels come from pip (`--deps pip`: `pip wheel` of the installed versions, from pip's
cache or PyPI) or, with no network at all, from the running environment itself (`--deps
installed`: each installed distribution is packed back into a wheel from its RECORD).
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import importlib.metadata as md
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spt_selfupdate.bundle import MANIFEST, SIGNATURE, write_bundle
from spt_selfupdate.trust import (
    DOMAIN,
    Artifact,
    manifest_document,
    parse_version,
    platform_tag,
    sha256_file,
    signature_document,
)

# distribution name -> its folder in the checkout
DISTS: Final = {
    "spt": ".",
    "spt-relay-fallback": "plugins/spt_relay_fallback",
    "spt-filetransfer": "plugins/spt_filetransfer",
    "spt-selfupdate": "plugins/spt_selfupdate",
}
_COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info", "tests", "build", "dist", ".*")

_BUILD_SNIPPET = """
import os, sys
from setuptools import build_meta
out = sys.argv[1]
for d in sys.argv[2:]:
    os.chdir(d)
    print(build_meta.build_wheel(out))
"""


# --- keys ------------------------------------------------------------------------------------


def keygen(path: Path) -> str:
    """Write a new private key (0600, refusing to overwrite); returns its public half in hex."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    private = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    ).hex()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"public": public, "private": private}, fh)
    return public


def load_key(path: Path) -> Ed25519PrivateKey:
    doc = json.loads(path.read_text())
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(doc["private"]))


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


# --- wheels ----------------------------------------------------------------------------------


def _versioned_copy(checkout: Path, folder: str, version: str, into: Path) -> Path:
    """A copy of one distribution's sources with its version (and spt pins) set to `version`."""
    src = checkout / folder
    dst = into / (folder.replace("/", "_").strip("._") or "spt")
    dst.mkdir(parents=True)
    text = (src / "pyproject.toml").read_text()
    text = re.sub(r'(?m)^version = "[^"]*"', f'version = "{version}"', text, count=1)
    text = re.sub(r'"spt==[^"]*"', f'"spt=={version}"', text)
    (dst / "pyproject.toml").write_text(text)
    for item in src.iterdir():
        if item.is_dir() and (item / "__init__.py").exists() and not item.name.startswith((".", "test")):
            shutil.copytree(item, dst / item.name, ignore=_COPY_IGNORE)
        elif item.name.lower().startswith(("readme", "license")):
            shutil.copy2(item, dst / item.name)
    init = dst / "spt" / "__init__.py"
    if init.exists():
        init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text()))
    return dst


def build_spt_wheels(checkout: Path, version: str, out: Path, dists: Iterable[str]) -> list[Path]:
    """Wheels of spt and the named plugin distributions at `version`, built offline."""
    with tempfile.TemporaryDirectory(prefix="spt-release-") as tmp:
        folders = [_versioned_copy(checkout, DISTS[d], version, Path(tmp)) for d in dists]
        result = subprocess.run(
            [sys.executable, "-c", _BUILD_SNIPPET, str(out), *map(str, folders)],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"building wheels failed:\n{result.stderr[-4000:]}")
        return [out / name for name in result.stdout.split() if name.endswith(".whl")]


def _requirement(text: str) -> tuple[str, bool]:
    """(normalised name, applies here) of a requirement string; extras-only ones do not apply."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[assignment]
    req = Requirement(text)
    applies = req.marker is None or req.marker.evaluate({"extra": ""})
    return _norm(req.name), bool(applies)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(roots: Iterable[str]) -> dict[str, str]:
    """Every installed distribution the roots need (name -> version), the roots excluded."""
    roots = {_norm(r) for r in roots}
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        dist = md.distribution(name)
        for text in dist.requires or []:
            dep, applies = _requirement(text)
            if applies and dep not in seen and dep not in roots:
                seen[dep] = md.distribution(dep).version
                todo.append(dep)
    return seen


def repack_installed(name: str, out: Path) -> Path:
    """Pack an installed distribution back into a wheel from its RECORD (no network, no build)."""
    dist = md.distribution(name)
    files = [f for f in dist.files or [] if not str(f).startswith("..") and "__pycache__" not in str(f)]
    info_dir = next((str(f).split("/")[0] for f in files if str(f).endswith(".dist-info/METADATA")), None)
    if info_dir is None:
        raise RuntimeError(f"{name} has no installed files to pack (an editable install?)")
    wheel_meta = Path(str(dist.locate_file(f"{info_dir}/WHEEL"))).read_text()
    tags = [line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")]
    parts = [sorted({t.split("-")[i] for t in tags}) for i in range(3)]
    tag = "-".join(".".join(p) for p in parts)
    dist_name = info_dir[: -len(".dist-info")].rsplit("-", 1)[0]
    path = out / f"{dist_name}-{dist.version}-{tag}.whl"
    skip = {f"{info_dir}/{n}" for n in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(files, key=str):
            rel = str(f)
            if rel in skip:
                continue
            data = Path(str(dist.locate_file(f))).read_bytes()
            zf.writestr(rel, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            writer.writerow([rel, f"sha256={digest}", len(data)])
        writer.writerow([f"{info_dir}/RECORD", "", ""])
        zf.writestr(f"{info_dir}/RECORD", record.getvalue())
    return path


def dependency_wheels(deps: dict[str, str], out: Path, how: str) -> list[Path]:
    if how == "installed":
        return [repack_installed(name, out) for name in sorted(deps)]
    before = set(out.iterdir())
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out),
         *[f"{n}=={v}" for n, v in sorted(deps.items())]],
        check=True,
    )
    return sorted(set(out.iterdir()) - before)


def make_artifact(wheels: Sequence[Path], path: Path) -> Path:
    """This platform's artifact: a flat, deterministic tar of the wheels."""
    with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tar:
        for w in sorted(wheels, key=lambda p: p.name):
            info = tar.gettarinfo(str(w), arcname=w.name)
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with open(w, "rb") as fh:
                tar.addfile(info, fh)
    return path


# --- signing and publishing ---------------------------------------------------------------------


def sign_manifest(manifest: bytes, key: Ed25519PrivateKey) -> bytes:
    return signature_document(public_hex(key), key.sign(DOMAIN + manifest))


def publish(
    folder: Path,
    version: str,
    artifact: Path,
    key: Ed25519PrivateKey,
    *,
    notes: str = "",
    tag: str | None = None,
    rotate_primary: str | None = None,
    released: str | None = None,
) -> Path:
    """Sign a release of `artifact` and publish it into the source `folder`; returns `folder/V`."""
    parse_version(version)
    tag = tag or platform_tag()
    release_dir = folder / version
    release_dir.mkdir(parents=True, exist_ok=True)
    art_name = f"spt-{version}-{tag}.tar"
    if artifact.resolve() != (release_dir / art_name).resolve():
        shutil.copyfile(artifact, release_dir / art_name)
    art = Artifact(tag, art_name, (release_dir / art_name).stat().st_size, sha256_file(release_dir / art_name))
    when = released or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = manifest_document(version, when, notes, [art], rotate_primary)
    (release_dir / MANIFEST).write_bytes(manifest)
    (release_dir / SIGNATURE).write_bytes(sign_manifest(manifest, key))
    write_bundle(release_dir / f"spt-{version}.sptupdate",
                 [release_dir / MANIFEST, release_dir / SIGNATURE, release_dir / art_name])
    latest = folder / "latest.json"
    try:
        current = json.loads(latest.read_text())["version"]
    except (OSError, ValueError, KeyError):
        current = None
    if current is None or parse_version(version) > parse_version(current):
        tmp = folder / ".latest.json.tmp"
        tmp.write_text(json.dumps({"version": version}))
        tmp.rename(latest)
    return release_dir


def build_release(
    checkout: Path, version: str, out: Path, key: Ed25519PrivateKey, *, deps: str = "pip",
    without: Sequence[str] = (), notes: str = "", rotate_primary: str | None = None,
) -> Path:
    dists = [d for d in DISTS if d not in without]
    with tempfile.TemporaryDirectory(prefix="spt-wheels-") as tmp:
        wheels_dir = Path(tmp)
        wheels = build_spt_wheels(checkout, version, wheels_dir, dists)
        needed = dependency_closure(dists)
        # pip rides along: the updater installs each release with that release's own pip wheel,
        # so no version depends on the pip of the one before (or on one being there at all).
        needed["pip"] = md.version("pip")
        wheels += dependency_wheels(needed, wheels_dir, deps)
        artifact = make_artifact(wheels, wheels_dir / "artifact.tar")
        return publish(out, version, artifact, key, notes=notes, rotate_primary=rotate_primary)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spt_selfupdate.release", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    kg = sub.add_parser("keygen", help="make a release key")
    kg.add_argument("--out", required=True, type=Path)
    b = sub.add_parser("build", help="build, sign and publish a release")
    b.add_argument("--version", required=True)
    b.add_argument("--key", required=True, type=Path, help="private key file (primary, or recovery to rotate)")
    b.add_argument("--out", required=True, type=Path, help="the source folder to publish into")
    b.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[3])
    b.add_argument("--deps", choices=("pip", "installed"), default="pip")
    b.add_argument("--notes", default="")
    b.add_argument("--without", action="append", default=[], choices=sorted(DISTS)[1:])
    b.add_argument("--rotate-primary", help="new primary public key (hex); sign with the recovery key")
    args = parser.parse_args(argv)
    if args.cmd == "keygen":
        print(keygen(args.out))
        return 0
    started = time.monotonic()
    where = build_release(
        args.checkout, args.version, args.out, load_key(args.key), deps=args.deps, without=args.without,
        notes=args.notes, rotate_primary=args.rotate_primary,
    )
    print(f"PUBLISHED:{args.version} {where} ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
