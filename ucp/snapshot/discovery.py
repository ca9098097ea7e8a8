"""Finding a node's snapshot agent: its discovery file (docs/agent.md), whether the process it names
still runs, and what a dead agent left behind.

Trainers (:mod:`ucp.snapshot.client`) and the agent itself (:mod:`ucp.snapshot.agent`) both read it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ucp.errors import AgentError, FormatError, UcpError
from ucp.format.jsonio import parse_json
from ucp.format.manifest import check_version
from ucp.snapshot import shm
from ucp.snapshot.header import SNAPSHOT_FORMAT_VERSION

FORMAT = "ucp.agent"
FORMAT_VERSION = "1.1"
REQUESTS = "ucp/requests"  # the store queue the agent serves


@dataclass(frozen=True)
class AgentInfo:
    """What the discovery file says about a running agent."""

    job: str
    pid: int
    start_time: int  # the process's start time in clock ticks since boot (/proc/<pid>/stat field 22)
    host: str
    port: int
    started: float  # wall clock (time.time())
    format: str = FORMAT
    format_version: str = FORMAT_VERSION
    snapshot_format_version: str = SNAPSHOT_FORMAT_VERSION  # the snapshot headers its code reads (1.0 if absent)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> "AgentInfo":
        """Parse and validate a discovery file (docs/agent.md)."""
        try:
            d = parse_json(data, str(where))
        except FormatError:
            raise FormatError(f"{where}: not a ucp agent discovery file (not JSON, or JSON nested too deeply)") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise FormatError(f"{where}: not a ucp agent discovery file (format is "
                              f"{d.get('format') if isinstance(d, dict) else None!r})")
        check_version(d.get("format_version"), FORMAT_VERSION, str(where))
        try:
            info = cls(job=shm.check_job(d["job"]), pid=int(d["pid"]), start_time=int(d["start_time"]),
                       host=str(d["host"]), port=int(d["port"]), started=float(d["started"]),
                       format_version=d["format_version"],
                       snapshot_format_version=str(d.get("snapshot_format_version", "1.0")))
        except (KeyError, TypeError, ValueError, UcpError) as e:
            raise FormatError(f"{where}: malformed agent discovery file: {e}") from None
        if info.pid <= 0 or not 0 < info.port < 65536:
            raise FormatError(f"{where}: malformed agent discovery file: pid {info.pid}, port {info.port}")
        return info


def discovery_path(job: str) -> Path:
    return shm.SHM_DIR / (shm.prefix(job) + "agent.json")


def lock_path(job: str) -> Path:
    return shm.SHM_DIR / (shm.prefix(job) + "agent.lock")


def process_start_time(pid: int) -> int | None:
    """Start time of process ``pid`` (clock ticks since boot), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields and fields[0] == "Z":
        return None  # a zombie is not an agent
    return int(fields[19])


def read_info(job: str) -> AgentInfo | None:
    """The discovery file of job ``job``'s agent on this node, or None."""
    path = discovery_path(job)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return AgentInfo.from_json(data, path)


def is_alive(info: AgentInfo) -> bool:
    """Whether the process the discovery file names is still that agent (not a recycled pid)."""
    return process_start_time(info.pid) == info.start_time


def reclaim(job: str) -> list[str]:
    """Remove what a dead agent of ``job`` left in shared memory (segments, discovery file); the
    names removed. Refuses while the agent is alive."""
    info = read_info(job) if discovery_path(job).exists() else None
    if info is not None and is_alive(info):
        raise AgentError(f"the agent of job {job!r} (pid {info.pid}) is running; stop it instead")
    removed = []
    for name in shm.listing(shm.prefix(job)):
        if name.endswith(".agent.lock"):
            continue
        if shm.unlink(name):
            removed.append(name)
    return removed
