"""Minds (SPEC.md §2.8, §8.3, §3.6 `endpoint mind`): a plugin on replicated records.

An agent appends to its endpoint's mind by dropping `<id>-commune.md` in its endpoint folder.
Once complete (unchanged for 1 s, or renamed into place with an older time) the file is split by
`# live` / `# project` lines into entries, each a signed, never-edited record of kind `mind`,
and deleted: its disappearance means success. A file that cannot be taken (too big, not UTF-8,
an entry over 64 KiB, nothing in it) becomes `<id>-commune.rejected.md` with a reason file next
to it and a `commune-rejected` notification.

Partitions: `live/<home>/<id>` (the endpoint's live tier) and `project/<home>/<id>/<project>`.
- Live entries are pushed at once to every node with a visible row of the endpoint in a subnet
  of its effective sync set (scope ∩ visible), and compared by anti-entropy with them.
- Project entries move only by anti-entropy (on connect, when a new instance appears, and every
  5 minutes), between nodes whose instance works on that project or already holds its tier.
- A node stores an entry only if it hosts the endpoint and the subnet it came through is in that
  instance's effective sync set, so a hidden instance or an out-of-scope subnet gets nothing.
Entries are read in HLC order, then id: the union of everyone's communes, the same everywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Final

from spt.core.errors import Refusal, RemoteProtocolError
from spt.core.identity import NodeId
from spt.hooks import NodeRuntime, RecordKind, Registry, ReplicatedRecord, SyncTier, hookimpl

log = logging.getLogger(__name__)

KIND: Final = "mind"
MAX_ENTRY_BYTES: Final = 64 * 1024
MAX_COMMUNE_BYTES: Final = 1024 * 1024  # larger files are refused unread
COMPLETE_AFTER: Final = 1.0  # seconds a commune must stay unchanged
SCAN_SECONDS: Final = 0.25
PROJECT_RECHECK: Final = 5.0  # seconds a folder's project id is reused before looking again
LOCAL_PREFIX: Final = "local-"  # projects of one folder on one node: never synced
_PROJECT_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEADING_RE: Final = re.compile(r"#\s*(live|project)\s*", re.IGNORECASE)


class LiveTier(SyncTier):
    name: ClassVar[str] = "live"
    eager: ClassVar[bool] = True


class ProjectTier(SyncTier):
    name: ClassVar[str] = "project"
    eager: ClassVar[bool] = False


# --- project identity (§2.8) ----------------------------------------------------------------


def normalise_origin(url: str) -> str:
    """`git@Host:a/b.git`, `https://user@host/a/b/` and `ssh://git@host/a/b` → `host/a/b`."""
    url = url.strip()
    if "://" in url:
        url = url.split("://", 1)[1]
        url = url.split("@", 1)[1] if "@" in url.split("/", 1)[0] else url
    elif ":" in url:  # scp-like
        host, _, path = url.partition(":")
        url = f"{host.split('@', 1)[-1]}/{path}"
    url = url.rstrip("/")
    url = url.removesuffix(".git")
    host, _, path = url.partition("/")
    return f"{host.lower()}/{path}"


def _git_origin(git: Path) -> str | None:
    if git.is_file():  # a worktree or submodule: "gitdir: <path>"
        text = git.read_text(errors="replace").strip()
        if not text.startswith("gitdir:"):
            return None
        git = (git.parent / text.split(":", 1)[1].strip()).resolve()
        common = git / "commondir"
        if common.is_file():
            git = (git / common.read_text().strip()).resolve()
    config = git / "config"
    if not config.is_file():
        return None
    section = None
    for line in config.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == '[remote "origin"]' and line.replace(" ", "").startswith("url="):
            return line.split("=", 1)[1].strip()
    return None


def project_of(folder: Path | None, node: NodeId) -> str | None:
    """The project id of a working folder: `.spt/project`, else a hash of the normalised git
    origin, else a local-only id (never synced); None without a folder."""
    if folder is None:
        return None
    folder = folder.resolve()
    for d in [folder, *list(folder.parents)[:64]]:
        marker = d / ".spt" / "project"
        if marker.is_file():
            first = (marker.read_text(errors="replace").strip().splitlines() or [""])[0].strip()
            if _PROJECT_RE.fullmatch(first):
                return first
        if (d / ".git").exists():
            origin = _git_origin(d / ".git")
            if origin:
                return hashlib.sha256(normalise_origin(origin).encode()).hexdigest()[:32]
            break
    return LOCAL_PREFIX + hashlib.sha256(node.hex.encode() + os.fsencode(folder)).hexdigest()[:24]


# --- commune files (§8.3) -------------------------------------------------------------------


class CommuneRejected(Exception):
    """Why a commune file was not taken."""


def split_commune(raw: bytes, *, has_project: bool) -> list[tuple[str, str]]:
    """(tier, body) per non-empty section; CommuneRejected when the file cannot be taken."""
    if len(raw) > MAX_COMMUNE_BYTES:
        raise CommuneRejected(f"the file is {len(raw)} bytes; the limit is {MAX_COMMUNE_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommuneRejected(f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if "\x00" in text:
        raise CommuneRejected("the file contains a NUL character")
    sections: list[tuple[str, list[str]]] = [("project" if has_project else "live", [])]
    for line in text.splitlines():
        heading = _HEADING_RE.fullmatch(line.strip())
        if heading:
            sections.append((heading.group(1).lower(), []))
        else:
            sections[-1][1].append(line)
    out: list[tuple[str, str]] = []
    for tier, lines in sections:
        body = "\n".join(lines).strip()
        if not body:
            continue
        if len(body.encode()) > MAX_ENTRY_BYTES:
            raise CommuneRejected(f"a {tier} section is {len(body.encode())} bytes; an entry is at most {MAX_ENTRY_BYTES}")
        out.append((tier, body))
    if not out:
        raise CommuneRejected("the file has no text in it")
    return out


# --- the record kind and the service ----------------------------------------------------------


def live_part(home: str, endpoint_id: str) -> str:
    return f"live/{home.lower()}/{endpoint_id.lower()}"


def project_part(home: str, endpoint_id: str, project: str) -> str:
    return f"project/{home.lower()}/{endpoint_id.lower()}/{project}"


def check_entry(data: Mapping[str, Any], part: str) -> None:
    if set(data) != {"home", "endpoint", "tier", "project", "body", "forked_from"}:
        raise RemoteProtocolError("mind", "a mind entry has home, endpoint, tier, project, body, forked_from")
    home, endpoint, tier, project, body = (data[k] for k in ("home", "endpoint", "tier", "project", "body"))
    if not all(isinstance(v, str) for v in (home, endpoint, body)) or tier not in ("live", "project"):
        raise RemoteProtocolError("mind", "bad mind entry fields")
    if len(body.encode("utf-8", "surrogatepass")) > MAX_ENTRY_BYTES:
        raise RemoteProtocolError("mind", "a mind entry is at most 64 KiB")
    if data["forked_from"] is not None and not isinstance(data["forked_from"], str):
        raise RemoteProtocolError("mind", "forked_from is a string or null")
    if tier == "live":
        if project is not None or part != live_part(home, endpoint):
            raise RemoteProtocolError("mind", "a live entry's partition names its endpoint")
    elif not isinstance(project, str) or not _PROJECT_RE.fullmatch(project) or part != project_part(home, endpoint, project):
        raise RemoteProtocolError("mind", "a project entry's partition names its endpoint and project")


class Minds(RecordKind):
    name: ClassVar[str] = KIND
    anti_entropy_seconds: ClassVar[float] = 300.0  # §8.3: the project tier every 5 minutes

    def __init__(self) -> None:
        self.runtime: NodeRuntime | None = None
        self._seen: dict[Path, tuple[int, int, float]] = {}  # commune -> (size, mtime_ns, first seen)
        self._synced: set[tuple[str, str, NodeId]] = set()  # (perch, subnet, node) fetched from
        self._projects: dict[Path | None, tuple[str | None, float]] = {}  # folder -> (project, when)

    # -- who holds what ---------------------------------------------------------------------

    def _local(self, home: str, endpoint_id: str) -> str | None:
        """The local perch id of endpoint (home, id), if this node hosts it."""
        assert self.runtime is not None
        for perch_id, perch_home in self.runtime.local_endpoints():
            if perch_home and perch_home.lower() == home.lower() and perch_id.lower() == endpoint_id.lower():
                return perch_id
        return None

    def _project(self, perch_id: str) -> str | None:
        """The project of a local endpoint's working folder (looked up at most every 5 s)."""
        assert self.runtime is not None
        folder = self.runtime.endpoint_workdir(perch_id)
        held = self._projects.get(folder)
        now = time.monotonic()
        if held is None or now - held[1] > PROJECT_RECHECK:
            held = self._projects[folder] = (project_of(folder, self.runtime.node_id), now)
        return held[0]

    def partitions(self, subnet: str, peer: NodeId) -> Sequence[str]:
        if self.runtime is None:
            return []
        held = set(self.runtime.replication.parts(KIND))
        out: list[str] = []
        for perch_id, home in self.runtime.local_endpoints():
            if not home or subnet not in self.runtime.effective_sync_subnets(perch_id):
                continue
            if peer not in self.runtime.instance_nodes(home, perch_id, subnet):
                continue
            out.append(live_part(home, perch_id))
            project = self._project(perch_id)
            prefix = project_part(home, perch_id, "")
            projects = {p for p in held if p.startswith(prefix)}
            if project is not None:
                projects.add(project_part(home, perch_id, project))
            out.extend(sorted(p for p in projects if not p[len(prefix):].startswith(LOCAL_PREFIX)))
        return out

    def accept(self, record: ReplicatedRecord, *, subnet: str, peer: NodeId) -> bool:
        check_entry(record.data, record.part)
        if self.runtime is None:
            return False
        perch_id = self._local(record.data["home"], record.data["endpoint"])
        if perch_id is None or subnet not in self.runtime.effective_sync_subnets(perch_id):
            return False  # not hosted here, hidden, or this subnet is out of the mind's scope
        if record.data["tier"] == "project":
            project = record.data["project"]
            return project == self._project(perch_id) or record.part in self.runtime.replication.parts(KIND)
        return True

    def recipients(self, record: ReplicatedRecord) -> Sequence[tuple[str, NodeId]]:
        if self.runtime is None or record.data["tier"] != "live":
            return ()  # the project tier moves by anti-entropy only
        perch_id = self._local(record.data["home"], record.data["endpoint"])
        if perch_id is None:
            return ()
        return [
            (subnet, node)
            for subnet in self.runtime.effective_sync_subnets(perch_id)
            for node in self.runtime.instance_nodes(record.data["home"], perch_id, subnet)
        ]

    # -- writing ------------------------------------------------------------------------------

    def append(self, perch_id: str, home: str, tier: str, body: str, *, project: str | None,
               forked_from: str | None = None) -> ReplicatedRecord:
        assert self.runtime is not None
        if tier == "project":
            if project is None:
                project = LOCAL_PREFIX + "none"
            part = project_part(home, perch_id, project)
        else:
            project = None
            part = live_part(home, perch_id)
        data = {"home": home.lower(), "endpoint": perch_id.lower(), "tier": tier, "project": project,
                "body": body, "forked_from": forked_from}
        return self.runtime.replication.publish(KIND, part, data)

    def _home(self, perch_id: str) -> str:
        assert self.runtime is not None
        home = dict((p.lower(), h) for p, h in self.runtime.local_endpoints()).get(perch_id.lower())
        return home or "local"  # a homeless endpoint's mind stays on this node

    def ingest(self, perch_id: str, path: Path) -> None:
        """Take one complete commune file, or reject it."""
        assert self.runtime is not None
        project = self._project(perch_id)
        try:
            size = path.stat().st_size
            if size > MAX_COMMUNE_BYTES:
                raise CommuneRejected(f"the file is {size} bytes; the limit is {MAX_COMMUNE_BYTES}")
            with path.open("rb") as fh:
                raw = fh.read(MAX_COMMUNE_BYTES + 1)
            sections = split_commune(raw, has_project=project is not None)
            home = self._home(perch_id)
            for tier, body in sections:
                self.append(perch_id, home, tier, body, project=project)
        except CommuneRejected as exc:
            self._reject(perch_id, path, str(exc))
            return
        except RemoteProtocolError as exc:  # an entry that encodes too large
            self._reject(perch_id, path, exc.message)
            return
        path.unlink(missing_ok=True)
        log.info("commune taken", extra={"perch": perch_id, "entries": len(sections)})

    def _reject(self, perch_id: str, path: Path, reason: str) -> None:
        assert self.runtime is not None
        rejected = path.with_name(f"{perch_id}-commune.rejected.md")
        os.replace(path, rejected)
        rejected.with_name(f"{perch_id}-commune.rejected.reason.txt").write_text(reason + "\n")
        log.warning("commune rejected", extra={"perch": perch_id, "reason": reason})
        home = self._home(perch_id)
        try:
            self.runtime.raise_notification(
                "commune-rejected", f"a commune of {perch_id} was rejected", f"{reason}; the file is {rejected}",
                subnet=None if home == "local" else home,
            )
        except Exception:
            log.exception("could not raise the commune-rejected notification")

    def scan(self) -> None:
        """Look at every local endpoint folder once for commune files."""
        assert self.runtime is not None
        now = time.time()
        live: set[Path] = set()
        for perch_id, _home in self.runtime.local_endpoints():
            path = self.runtime.endpoint_folder(perch_id) / f"{perch_id}-commune.md"
            try:
                st = path.stat()
            except OSError:
                continue
            live.add(path)
            size_mtime = (st.st_size, st.st_mtime_ns)
            seen = self._seen.get(path)
            if seen is None or seen[:2] != size_mtime:
                self._seen[path] = (*size_mtime, now)
                seen = self._seen[path]
            if now - st.st_mtime >= COMPLETE_AFTER or now - seen[2] >= COMPLETE_AFTER:
                self._seen.pop(path, None)
                try:
                    self.ingest(perch_id, path)
                except OSError:
                    log.exception("commune could not be read", extra={"perch": perch_id})
        for gone in set(self._seen) - live:
            del self._seen[gone]

    def fetch_new_instances(self) -> None:
        """A co-host newly visible in the registry (or this instance new): fetch its tiers now."""
        assert self.runtime is not None
        for perch_id, home in self.runtime.local_endpoints():
            if not home:
                continue
            for subnet in self.runtime.effective_sync_subnets(perch_id):
                for node in self.runtime.instance_nodes(home, perch_id, subnet):
                    key = (perch_id.lower(), subnet.lower(), node)
                    if key not in self._synced:
                        self._synced.add(key)
                        self.runtime.replication.request_sync(node)

    async def loop(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(SCAN_SECONDS)
            tick += 1
            try:
                self.scan()
                if tick % 4 == 0:
                    self.fetch_new_instances()
            except Exception:
                log.exception("mind scan failed")

    # -- reading and forking -------------------------------------------------------------------

    def read(self, perch_id: str, tier: str | None, project_dir: str | None) -> dict[str, Any]:
        assert self.runtime is not None
        home = self._home(perch_id)
        doc: dict[str, Any] = {"id": perch_id, "live": [], "project": None}
        if tier in (None, "live"):
            doc["live"] = [_entry(r) for r in self.runtime.replication.records(KIND, live_part(home, perch_id))]
        if tier in (None, "project"):
            folder = Path(project_dir) if project_dir else self.runtime.endpoint_workdir(perch_id)
            project = project_of(folder, self.runtime.node_id)
            if project is not None:
                records = self.runtime.replication.records(KIND, project_part(home, perch_id, project))
                doc["project"] = {"id": project, "entries": [_entry(r) for r in records]}
        return doc

    def fork(self, source_id: str, new_id: str) -> None:
        """§4.7: the new identity starts with a copy of the live tier and the current project tier."""
        assert self.runtime is not None
        source_home, new_home = self._home(source_id), self._home(new_id)
        project = self._project(source_id)
        copies = list(self.runtime.replication.records(KIND, live_part(source_home, source_id)))
        if project is not None:
            copies += self.runtime.replication.records(KIND, project_part(source_home, source_id, project))
        for r in copies:
            self.append(new_id, new_home, r.data["tier"], r.data["body"], project=r.data["project"],
                        forked_from=f"{source_id}:{r.id}")

    def register_ops(self, runtime: NodeRuntime) -> None:
        async def read_op(call: Any) -> Any:
            perch_id = str(call.args.get("id") or "")
            if not any(p.lower() == perch_id.lower() for p, _ in runtime.local_endpoints()):
                raise Refusal("NO_PERCH", perch_id, "no local perch has that id")
            perch_id = next(p for p, _ in runtime.local_endpoints() if p.lower() == perch_id.lower())
            tier = call.args.get("tier")
            if tier not in (None, "live", "project"):
                raise Refusal("BAD_USAGE", str(tier), "--tier is live or project")
            return self.read(perch_id, tier, call.args.get("project"))

        runtime.add_op("mind.read", read_op)


def _entry(r: ReplicatedRecord) -> dict[str, Any]:
    from datetime import UTC, datetime

    return {
        "id": r.id, "tier": r.data["tier"], "project": r.data["project"], "author": r.author.hex,
        "time": datetime.fromtimestamp(r.hlc.wall_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hlc": str(r.hlc), "body": r.data["body"], "forked_from": r.data["forked_from"],
    }


SERVICE: Final = Minds()


@hookimpl
def spt_register_sync_tiers(registry: Registry[SyncTier]) -> None:
    registry.add(LiveTier())
    registry.add(ProjectTier())


@hookimpl
def spt_register_record_kinds(registry: Registry[RecordKind]) -> None:
    registry.add(SERVICE)


@hookimpl
def spt_runtime_started(runtime: NodeRuntime) -> None:
    SERVICE.runtime = runtime
    SERVICE.register_ops(runtime)
    runtime.add_fork_listener(SERVICE.fork)
    runtime.spawn(SERVICE.loop(), "mind communes")
