"""The updater inside a running node (SPEC.md §8.8), on the public `NodeRuntime` only.

Control operations (what `spt update …` calls): `update.status`, `update.fetch`,
`update.apply` (elevated), `update.auto` (elevated), and `update.selfcheck` (the watchdog asks
the new daemon). Member requests: `update.offer` (the manifest and signature of the release this
node offers) and `update.chunk` (a byte range of its artifact), answered only to members of the
subnet the request names.

Staging: a release from a source folder or URL, an offline bundle, or a member is verified here
in full (signature by a trusted key, version above the installed one and the highest ever
applied, size and digest of this platform's artifact, a tar of wheels with spt at that version)
and only then renamed into `staged/`. It is then announced in presence, and an `update-consent`
notification asks the user to apply it (or, with `spt update auto on`, it is applied at once).

Apply: verify again, install the artifact offline into `<root>/versions/<v>/`, record the trial,
start the watchdog (the previous version's interpreter), flip `<root>/current`, then restart the
daemon into the new environment (same pid). The watchdog confirms the new daemon's self-check
within 30 s, or switches back and records APPLY_FAILED (watchdog.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Final

from spt import __version__
from spt.core.errors import PeerError, Refusal, RemoteProtocolError, SptError
from spt.hooks import MemberPresence, NodeRuntime
from spt_selfupdate.bundle import MANIFEST, SIGNATURE, copy_source, latest_version, read_bundle, read_source
from spt_selfupdate.install import (
    adopt_running,
    flip_current,
    install_artifact,
    install_root,
    python_of,
    version_dir,
)
from spt_selfupdate.state import UpdateState
from spt_selfupdate.trust import (
    _FILE_RE,
    MAX_MANIFEST,
    Release,
    VerifyFailed,
    parse_version,
    platform_tag,
    verify_artifact,
    verify_manifest,
)

log = logging.getLogger(__name__)

CHUNK: Final = 1 << 20
PEER_TIMEOUT: Final = 15.0
REFUSED_FOR: Final = 600.0  # seconds a member's bad offer is not tried again
SELF_CHECK_SECONDS: Final = 30.0
OWN_DISTS: Final = frozenset({"spt", "spt-relay-fallback", "spt-filetransfer", "spt-selfupdate"})
RESTART_DELAY: Final = 0.2  # lets the apply answer reach the CLI before the daemon stops
PARTIAL_FROM: Final = ".partial-from"  # in a member download's folder: who sent the bytes so far
ARTIFACT_FAILURES: Final = frozenset({"digest-mismatch", "size-mismatch", "bad-artifact"})


class UpdateService:
    def __init__(self, runtime: NodeRuntime) -> None:
        self.rt = runtime
        cfg = runtime.config_section("update")
        self.source: str | None = cfg.get("source") or None
        self.check: bool = bool(cfg.get("check", True))
        self.check_interval = float(cfg.get("check_interval", 12 * 3600))
        self.peer_interval = float(cfg.get("peer_interval", 60))
        self.root = install_root(cfg.get("root"), runtime.state_dir)
        self.state = UpdateState(runtime.state_dir)
        self.tag = platform_tag()
        # SPEC.md §7.7: without the relay plugin the node talks to members only: --file bundles.
        self.air_gapped = runtime.plugin_status().get("relay") != "ok"
        self._busy = asyncio.Lock()
        self._refused: dict[tuple[str, str], float] = {}

    def register(self) -> None:
        rt = self.rt
        rt.add_op("update.status", self.op_status)
        rt.add_op("update.fetch", self.op_fetch)
        rt.add_op("update.apply", self.op_apply, elevated=True)
        rt.add_op("update.auto", self.op_auto, elevated=True)
        rt.add_op("update.selfcheck", self.op_selfcheck)
        rt.add_member_request("update.offer", self.req_offer)
        rt.add_member_request("update.chunk", self.req_chunk)
        servable = self.state.servable()
        rt.announce_release(servable[0] if servable else None)
        self._report_failed_apply()
        rt.spawn(self._peer_loop(), "update: releases offered by members")
        if self.source and self.check and not self.air_gapped:
            rt.spawn(self._source_loop(), "update: source check")

    def stop(self) -> None:
        self.state.close()

    # -- control operations ------------------------------------------------------------------

    async def op_status(self, call: Any) -> dict[str, Any]:
        staged = self.state.get("staged")
        return {
            "current": __version__,
            "staged": {k: staged[k] for k in ("version", "signed_by", "source")} if staged else None,
            "policy": self.state.get("policy") or "consent",
            "source": None if self.air_gapped else self.source,
            "last_apply": self.state.get("last_apply"),
            "highest_applied": self.state.get("highest_applied"),
            "root": str(self.root),
            "platform": self.tag,
            "air_gapped": self.air_gapped,
        }

    async def op_fetch(self, call: Any) -> dict[str, Any]:
        args = call.args
        file, url = args.get("file"), args.get("from")
        async with self._busy:
            if file:
                return await self._fetch_file(Path(str(file)))
            source = url or self.source
            if self.air_gapped:
                raise Refusal("AIR_GAPPED", "", "this build has no relay plugin: it fetches only --file bundles")
            if not source:
                raise Refusal("NO_SOURCE", "", "no update.source is configured; pass --from URL or --file BUNDLE")
            return await self._fetch_source(str(source))

    async def op_apply(self, call: Any) -> dict[str, Any]:
        async with self._busy:
            return await self._apply()

    async def op_auto(self, call: Any) -> dict[str, Any]:
        policy = "auto" if call.args.get("on") else "consent"
        self.state.set("policy", policy)
        return {"policy": policy}

    async def op_selfcheck(self, call: Any) -> dict[str, Any]:
        """Is this daemon the version being applied, with every plugin that worked before?"""
        trial = self.state.get("trial")
        if not trial:
            return {"ok": True, "reason": None}
        if trial["version"] != __version__:
            return {"ok": False, "reason": f"running {__version__}, expected {trial['version']}"}
        status = self.rt.plugin_status()
        broken = [name for name in trial.get("plugins", []) if status.get(name) != "ok"]
        if broken:
            return {"ok": False, "reason": f"plugins no longer load: {', '.join(broken)}"}
        return {"ok": True, "reason": None}

    # -- fetching and staging -----------------------------------------------------------------

    def _incoming(self, name: str, *, fresh: bool) -> Path:
        folder = self.state.incoming_dir / name
        if fresh and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _check_manifest(self, manifest: bytes, sig: bytes) -> Release:
        return verify_manifest(
            manifest, sig, self.state.trusted_keys(), installed=__version__,
            highest_applied=self.state.get("highest_applied"),
        )

    def _already(self, release: Release) -> dict[str, Any] | None:
        """An answer without staging, when this release (or a newer one) is staged already."""
        staged = self.state.get("staged")
        if staged and self.state.staged_path() is not None:
            if staged["version"] == release.version:
                return {"token": "STAGED", "version": release.version}
            if parse_version(staged["version"]) > release.key:
                return {"token": "UP_TO_DATE", "version": staged["version"]}
        return None

    async def _fetch_file(self, path: Path) -> dict[str, Any]:
        folder = self._incoming("file", fresh=True)
        try:
            await asyncio.to_thread(read_bundle, path, folder)
            release = self._check_manifest((folder / MANIFEST).read_bytes(), (folder / SIGNATURE).read_bytes())
            return await self._finish(release, folder, f"file {path.name}")
        except VerifyFailed as exc:
            return self._answer_failure(exc, folder)

    async def _fetch_source(self, source: str) -> dict[str, Any]:
        folder: Path | None = None
        try:
            version = await asyncio.to_thread(latest_version, source)
            parse_version(version)
            manifest = await asyncio.to_thread(read_source, source, version, MANIFEST, limit=MAX_MANIFEST)
            sig = await asyncio.to_thread(read_source, source, version, SIGNATURE, limit=4096)
            release = self._check_manifest(manifest, sig)
            if (done := self._already(release)) is not None:
                return done
            art = release.artifact_for(self.tag)
            folder = self._incoming(f"{release.version}-source", fresh=False)
            (folder / MANIFEST).write_bytes(manifest)
            (folder / SIGNATURE).write_bytes(sig)
            await asyncio.to_thread(copy_source, source, (version, art.file), folder / art.file, art.size)
            return await self._finish(release, folder, source)
        except VerifyFailed as exc:
            return self._answer_failure(exc, folder)

    def _answer_failure(self, exc: VerifyFailed, folder: Path | None) -> dict[str, Any]:
        if exc.reason == "up-to-date":
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            return {"token": "UP_TO_DATE", "version": __version__}
        # A partial download is kept for resume; anything that failed its checks is dropped.
        if folder is not None and exc.reason not in ("source-unreachable",):
            shutil.rmtree(folder, ignore_errors=True)
        log.warning("release refused", extra={"reason": exc.reason, "detail": exc.message})
        raise exc

    async def _finish(self, release: Release, folder: Path, source: str) -> dict[str, Any]:
        """Verify the artifact in `folder`, then stage it (the only way anything gets staged)."""
        if (done := self._already(release)) is not None:
            shutil.rmtree(folder, ignore_errors=True)
            return done
        art = release.artifact_for(self.tag)
        await asyncio.to_thread(verify_artifact, release, self.tag, folder / art.file)
        for extra in folder.iterdir():  # only what was verified is kept
            if extra.name not in (MANIFEST, SIGNATURE, art.file):
                extra.unlink()
        if release.rotate_primary is not None:
            self._learn_rotation(release.manifest_bytes, release.sig_bytes)
        self.state.stage(release.version, folder, {"signed_by": release.signed_by, "source": source})
        self.rt.announce_release(release.version)
        log.info("release staged", extra={"version": release.version, "from": source})
        if self.state.get("policy") == "auto":
            self.rt.spawn(self._auto_apply(), "update: automatic apply")
        else:
            self.rt.raise_notification(
                "update-consent", f"spt {release.version} is staged on {self.rt.label}",
                f"run `spt update apply` there to install it (signed by the {release.signed_by} key, from {source})",
            )
        return {"token": "STAGED", "version": release.version}

    def _learn_rotation(self, manifest: bytes, sig: bytes) -> None:
        """Accept a recovery-signed rotation released after the installed version (a node that
        missed it gets it with a member's offer), and newer than the last accepted here. The
        installed build embeds every rotation up to its own release, so an older one changes
        nothing: replayed, it would bring back a retired primary."""
        keys = self.state.trusted_keys()
        try:
            release = verify_manifest(manifest, sig, keys, installed=__version__)
        except VerifyFailed as exc:
            if exc.reason in ("up-to-date", "rollback"):
                log.info("a key rotation not newer than this build was ignored", extra={"detail": exc.message})
                return
            raise
        if release.signed_by != "recovery" or release.rotate_primary is None:
            raise VerifyFailed("rotation-not-by-recovery", "not a rotation")
        last = self.state.rotation()
        if last is not None and release.key <= parse_version(last[0]):
            return  # this one, or an older one: already superseded here
        if release.rotate_primary != keys.primary:
            self.state.accept_rotation(keys, release.rotate_primary, release.version, manifest, sig)
            log.warning("release key rotated by the recovery key", extra={"primary": release.rotate_primary[:8]})

    # -- members --------------------------------------------------------------------------------

    async def _peer_loop(self) -> None:
        while True:
            await asyncio.sleep(self.peer_interval)
            try:
                await self.check_members()
            except Exception:
                log.exception("checking members' releases failed")

    def _newest_here(self) -> tuple[int, ...]:
        versions = [__version__, self.state.get("highest_applied")]
        staged = self.state.get("staged")
        if staged:
            versions.append(staged["version"])
        return max(parse_version(v) for v in versions if v)

    async def check_members(self) -> None:
        """Stage the newest release a member offers, if it is newer than anything here."""
        now = time.monotonic()
        mine = self._newest_here()
        offers: list[MemberPresence] = []
        for p in self.rt.member_presence():
            if not p.staged_release or self._refused.get((p.node.hex, p.staged_release), 0) > now:
                continue
            try:
                if parse_version(p.staged_release) > mine:
                    offers.append(p)
            except VerifyFailed:
                continue
        offers.sort(key=lambda p: parse_version(str(p.staged_release)), reverse=True)
        for offer in offers:
            async with self._busy:
                if parse_version(str(offer.staged_release)) <= self._newest_here():
                    return
                try:
                    await self._fetch_member(offer)
                    return
                except VerifyFailed as exc:
                    self._refused[(offer.node.hex, str(offer.staged_release))] = now + REFUSED_FOR
                    log.warning("a member's release was refused", extra={
                        "peer": offer.node.short, "version": offer.staged_release, "reason": exc.reason})
                except (PeerError, TimeoutError, RemoteProtocolError, OSError) as exc:
                    log.info("fetching a member's release paused", extra={"peer": offer.node.short, "reason": str(exc)})

    async def _fetch_member(self, offer: MemberPresence) -> None:
        conn = await self.rt.connect_member(offer.node)
        ask = {"subnet": offer.subnet, "version": offer.staged_release}
        reply = await conn.request("update.offer", ask, timeout=PEER_TIMEOUT)
        body = reply.body if isinstance(reply.body, dict) else {}
        manifest, sig = body.get("manifest"), body.get("sig")
        if not isinstance(manifest, bytes) or not isinstance(sig, bytes):
            raise RemoteProtocolError("update.offer", "expected manifest and sig bytes")
        rotation = body.get("rotation")
        if isinstance(rotation, dict) and isinstance(rotation.get("manifest"), bytes) \
                and isinstance(rotation.get("sig"), bytes):
            try:  # checked like any release signature: only the recovery key can rotate
                self._learn_rotation(rotation["manifest"], rotation["sig"])
            except VerifyFailed as exc:
                log.warning("a member's key rotation was refused", extra={"peer": offer.node.short, "reason": exc.reason})
        release = self._check_manifest(manifest, sig)  # never the member's word: our own check
        if release.version != offer.staged_release:
            raise VerifyFailed("malformed-manifest", f"offered {offer.staged_release}, sent {release.version}")
        art = release.artifact_for(self.tag)
        folder = self._incoming(f"{release.version}-member", fresh=False)
        (folder / MANIFEST).write_bytes(manifest)
        (folder / SIGNATURE).write_bytes(sig)
        target = folder / art.file
        # Resume only bytes this same member sent: another member's partial (garbage, perhaps,
        # from one that then stopped) would fail the digest and blame this one for it.
        supplier = folder / PARTIAL_FROM
        if target.exists() and supplier.exists() and supplier.read_text() == offer.node.hex:
            offset = target.stat().st_size
        else:
            offset = 0
            target.unlink(missing_ok=True)
            supplier.write_text(offer.node.hex)
        resumed = offset > 0
        log.info("fetching a member's release", extra={
            "peer": offer.node.short, "version": release.version, "resume_from": offset, "size": art.size})
        with open(target, "ab") as out:
            while offset < art.size:
                length = min(CHUNK, art.size - offset)
                chunk = await conn.request(
                    "update.chunk", {**ask, "file": art.file, "offset": offset, "length": length}, timeout=PEER_TIMEOUT
                )
                data = chunk.body.get("data") if isinstance(chunk.body, dict) else None
                if not isinstance(data, bytes) or not data or len(data) > length:
                    break  # short: verification below names it
                out.write(data)
                out.flush()
                offset += len(data)
        if offset < art.size:  # the member stopped short: keep what arrived and resume later
            raise RemoteProtocolError("update.chunk", f"{offset} of {art.size} bytes so far")
        try:
            await self._finish(release, folder, offer.node.display(offer.label))
        except VerifyFailed as exc:
            shutil.rmtree(folder, ignore_errors=True)
            if resumed and exc.reason in ARTIFACT_FAILURES:
                # The bytes from before the resume may be at fault: start over, blaming no one.
                raise RemoteProtocolError("update.chunk", f"a resumed download failed ({exc.reason}); starting over") from None
            raise exc

    def _offered(self, conn: Any, body: Any) -> tuple[dict[str, Any], Path]:
        if not isinstance(body, dict) or not isinstance(body.get("subnet"), str):
            raise RemoteProtocolError("update", "expected {subnet, version}")
        if not self.rt.member_subnet(conn, body["subnet"]):
            raise Refusal("NOT_A_MEMBER", body["subnet"], "releases are offered to members of a shared subnet only")
        servable = self.state.servable()
        if servable is None or servable[0] != body.get("version"):
            raise Refusal("NO_RELEASE", str(body.get("version"))[:20], "this node does not offer that release")
        return body, servable[1]

    async def req_offer(self, conn: Any, frame: Any) -> tuple[str, Any]:
        _, folder = self._offered(conn, frame.body)
        rotation = self.state.rotation()
        return "update.release", {
            "manifest": (folder / MANIFEST).read_bytes(), "sig": (folder / SIGNATURE).read_bytes(),
            "rotation": {"manifest": rotation[1], "sig": rotation[2]} if rotation else None,
        }

    async def req_chunk(self, conn: Any, frame: Any) -> tuple[str, Any]:
        body, folder = self._offered(conn, frame.body)
        name, offset, length = body.get("file"), body.get("offset"), body.get("length")
        if not isinstance(name, str) or not _FILE_RE.match(name) or name in (MANIFEST, SIGNATURE) \
                or not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or not 0 < length <= CHUNK:
            raise RemoteProtocolError("update.chunk", "expected file, offset and length (at most 1 MiB)")
        path = folder / name
        if not path.is_file():
            raise Refusal("NO_RELEASE", name, "no such artifact")

        def read() -> bytes:
            with open(path, "rb") as fh:
                fh.seek(offset)
                return fh.read(length)

        return "update.data", {"data": await asyncio.to_thread(read)}

    # -- the source ------------------------------------------------------------------------------

    async def _source_loop(self) -> None:
        while True:
            last = float(self.state.get("last_check") or 0)
            await asyncio.sleep(max(1.0, last + self.check_interval - time.time()))
            self.state.set("last_check", time.time())
            assert self.source is not None
            try:
                async with self._busy:
                    await self._fetch_source(self.source)
            except SptError as exc:
                log.info("update check found nothing to stage", extra={"reason": exc.status_line()})
            except Exception:
                log.exception("update check failed")

    # -- apply -------------------------------------------------------------------------------------

    async def _auto_apply(self) -> None:
        try:
            async with self._busy:
                await self._apply()
        except SptError as exc:
            log.warning("automatic apply failed", extra={"reason": exc.status_line()})

    async def _apply(self) -> dict[str, Any]:
        staged = self.state.get("staged")
        folder = self.state.staged_path()
        if not staged or folder is None:
            raise Refusal("NOTHING_STAGED", "", "nothing is staged; run spt update fetch first")
        kept = f"(kept {__version__})"
        try:  # SPEC.md §8.8: apply verifies the staged bytes again
            release = self._check_manifest((folder / MANIFEST).read_bytes(), (folder / SIGNATURE).read_bytes())
            art = release.artifact_for(self.tag)
            await asyncio.to_thread(verify_artifact, release, self.tag, folder / art.file)
        except VerifyFailed as exc:
            raise Refusal("APPLY_FAILED", f"verify-{exc.reason}", kept) from None
        started = time.monotonic()
        try:
            env = await asyncio.to_thread(
                install_artifact, self.root, release.version, folder / art.file,
                log=self.rt.state_dir / "selfupdate" / "install.log",
            )
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            log.warning("installing a release failed", extra={"version": release.version, "reason": str(exc)})
            self.state.set("last_apply", {"version": release.version, "previous": __version__, "outcome": "failed",
                                          "reason": f"install: {exc}", "time": time.time(), "reported": True})
            raise Refusal("APPLY_FAILED", "install", kept) from None
        log.info("release installed", extra={"version": release.version, "seconds": round(time.monotonic() - started, 1)})
        adopt_running(self.root, __version__)
        self.state.set("trial", {
            "version": release.version, "previous": __version__, "previous_python": sys.executable,
            "plugins": self._own_plugins_ok(), "argv": sys.argv[1:], "pid": os.getpid(), "restart_at": time.time(),
        })
        self.state.set("last_apply", {"version": release.version, "previous": __version__, "outcome": "pending",
                                      "reason": None, "time": time.time(), "reported": False})
        self._start_watchdog(release.version)
        flip_current(self.root, release.version)
        new_python = str(python_of(version_dir(self.root, release.version)))
        assert env == version_dir(self.root, release.version)

        async def restart() -> None:
            await asyncio.sleep(RESTART_DELAY)
            self.rt.restart(new_python)

        self.rt.spawn(restart(), "update: restart into the new version")
        return {"version": release.version, "previous": __version__, "restarting": True}

    def _own_plugins_ok(self) -> list[str]:
        """The plugins of spt's own distributions that load here: the new version must load them
        too. Third-party plugins are not spt's to vouch for (SPEC.md §8.8) and are not counted."""
        own = {
            ep.name for ep in entry_points(group="spt.plugins")
            if ep.dist is not None and ep.dist.name.replace("_", "-").lower() in OWN_DISTS
        }
        return sorted(n for n, s in self.rt.plugin_status().items() if s == "ok" and n in own)

    def _start_watchdog(self, version: str) -> None:
        log_file = self.rt.state_dir / "daemon.log"
        with open(log_file, "ab") as out:
            subprocess.Popen(
                [sys.executable, "-m", "spt_selfupdate.watchdog", "--state", str(self.rt.state_dir),
                 "--root", str(self.root), "--pid", str(os.getpid()), "--version", version,
                 "--previous", __version__, "--timeout", str(SELF_CHECK_SECONDS)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True,
            )

    def _report_failed_apply(self) -> None:
        """After a rollback: tell the user, and stop offering the release that failed here (a
        member would only fail the same way); a later fetch may stage it again."""
        last = self.state.get("last_apply")
        staged = self.state.get("staged")
        if last and last.get("outcome") == "failed" and staged and staged["version"] == last["version"]:
            self.state.set("staged", None)
            shutil.rmtree(self.state.staged_dir / str(staged["version"]), ignore_errors=True)
            servable = self.state.servable()
            self.rt.announce_release(servable[0] if servable else None)
        if last and last.get("outcome") == "failed" and not last.get("reported"):
            self.rt.raise_notification(
                "update-consent", f"spt {last['version']} failed and was rolled back on {self.rt.label}",
                f"{last['reason']}; kept {last['previous']}",
            )
            self.state.set("last_apply", {**last, "reported": True})
