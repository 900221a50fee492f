"""The versioned layout self-update manages, and installing a release into it offline.

    <root>/versions/<v>/     one virtual environment per version (`.complete` once installed)
    <root>/current           symlink to versions/<v>: what `spt` on PATH and services run

The switch is one `rename` of a fresh symlink over `current`, so a reader sees the old target or
the new one, never neither. The previous version's environment stays for rollback.

`<root>` is `update.root` when configured, else the layout the running interpreter lives in
(`…/versions/<v>/`), else `<state folder>/install`. An spt installed some other way (a plain
venv, a development checkout) is adopted on its first apply: `versions/<its version>` becomes a
symlink to its environment, so switching back has somewhere to go.

Bootstrap (README): `python -m spt_selfupdate.install --root R --file spt-<v>.sptupdate` installs a
verified bundle into `R/versions/<v>` and points `R/current` at it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Final

COMPLETE: Final = ".complete"
PIP_TIMEOUT: Final = 600.0


def install_root(configured: str | None, state_dir: Path) -> Path:
    if configured:
        return Path(configured).expanduser()
    prefix = Path(sys.prefix)
    if prefix.parent.name == "versions":
        return prefix.parent.parent
    return state_dir / "install"


def version_dir(root: Path, version: str) -> Path:
    return root / "versions" / version


def python_of(env: Path) -> Path:
    return env / "bin" / "python"


def adopt_running(root: Path, version: str) -> None:
    """Make sure the running version has a place in the layout (a symlink to its environment)."""
    target = version_dir(root, version)
    if target.exists() or target.is_symlink():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(Path(sys.prefix).resolve(), target_is_directory=True)


def current_version(root: Path) -> str | None:
    link = root / "current"
    try:
        return Path(os.readlink(link)).name
    except OSError:
        return None


def flip_current(root: Path, version: str) -> None:
    """Point `current` at `versions/<version>` with one rename."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".current.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(Path("versions") / version, target_is_directory=True)
    os.replace(tmp, root / "current")


def install_artifact(root: Path, version: str, artifact: Path, *, log: Path | None = None) -> Path:
    """Install a verified artifact (tar of wheels) into `versions/<version>` with no network.

    Idempotent: a complete environment is reused; a half-made one is removed and made again.
    Raises RuntimeError with pip's last words when the install fails.
    """
    env = version_dir(root, version)
    if (env / COMPLETE).exists():
        return env
    if env.is_symlink():
        env.unlink()
    elif env.exists():
        shutil.rmtree(env)
    env.parent.mkdir(parents=True, exist_ok=True)
    base_python = getattr(sys, "_base_executable", sys.executable)
    with tempfile.TemporaryDirectory(prefix="spt-wheels-", dir=root) as tmp:
        with tarfile.open(artifact, "r:") as tar:
            names = [m.name for m in tar if m.isfile() and m.name.endswith(".whl") and "/" not in m.name]
            for name in names:
                src = tar.extractfile(name)
                assert src is not None
                with open(Path(tmp) / name, "wb") as out:
                    shutil.copyfileobj(src, out)
        # The release's own pip wheel (bundled by the release tool) runs inside the new
        # environment; pip can run from its wheel. Without one, this interpreter's pip does it.
        own_pip = next((n for n in names if n.startswith("pip-")), None)
        pip = [str(python_of(env)), str(Path(tmp) / own_pip / "pip")] if own_pip else \
            [sys.executable, "-m", "pip", "--python", str(python_of(env))]
        steps = [
            [base_python, "-m", "venv", "--without-pip", str(env)],
            [*pip, "install", "--no-index", "--find-links", tmp, "--disable-pip-version-check",
             "--no-input", "-q", "--no-compile", *[str(Path(tmp) / n) for n in sorted(names)]],
        ]
        for cmd in steps:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT, check=False,
                                    env={k: v for k, v in os.environ.items() if not k.startswith("PIP_")})
            if log is not None:
                with open(log, "a") as fh:
                    fh.write(f"$ {' '.join(cmd[:6])} …\n{result.stdout}{result.stderr}")
            if result.returncode != 0:
                raise RuntimeError((result.stderr or result.stdout).strip().splitlines()[-1:][0] if
                                   (result.stderr or result.stdout).strip() else f"exit {result.returncode}")
    (env / COMPLETE).write_text(version)
    return env


def main(argv: list[str] | None = None) -> int:
    """Bootstrap an install from a bundle: verify it against the embedded keys, install, point
    `current` at it."""
    import argparse

    from spt_selfupdate.bundle import MANIFEST, SIGNATURE, read_bundle
    from spt_selfupdate.trust import (
        VerifyFailed,
        embedded_keys,
        platform_tag,
        verify_artifact,
        verify_manifest,
    )

    parser = argparse.ArgumentParser(prog="python -m spt_selfupdate.install")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--file", required=True, type=Path, help="an offline bundle (spt-<v>.sptupdate)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        try:
            read_bundle(args.file, folder)
            release = verify_manifest((folder / MANIFEST).read_bytes(), (folder / SIGNATURE).read_bytes(),
                                      embedded_keys(), installed="0")
            art = release.artifact_for(platform_tag())
            verify_artifact(release, platform_tag(), folder / art.file)
        except VerifyFailed as exc:
            print(exc.status_line(), file=sys.stderr)
            return 1
        env = install_artifact(args.root, release.version, folder / art.file)
    flip_current(args.root, release.version)
    print(f"INSTALLED:{release.version} {env}")
    print(f"put {args.root / 'current' / 'bin'} on PATH (it holds spt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
