"""One error hierarchy for ucp.

Every failure a user can cause or meet (bad input, a corrupted checkpoint, a rank that diverged,
a failed collective) is a :class:`UcpError`. The CLI turns any of them into one line on stderr and a
non-zero exit code; library callers can catch the base class or a precise subclass.
"""

from __future__ import annotations


def few(items: list, n: int = 5, total: int | None = None) -> str:
    """Up to ``n`` of ``items`` for an error message, and how many more there are ("none" if empty);
    ``total``: how many there are when ``items`` holds only the first of them."""
    if not items:
        return "none"
    total = len(items) if total is None else total
    return ", ".join(map(str, items[:n])) + (f" and {total - n} more" if total > n else "")


class UcpError(Exception):
    """Base class of every error ucp raises on purpose."""

    exit_code = 1


class SpecError(UcpError, ValueError):
    """A value of the data model (layout, box, pattern, manifest field) is invalid."""


class OptionsError(UcpError, ValueError):
    """An option passed to a public constructor is invalid; the message says how to fix it."""


class LocationError(OptionsError):
    """A location ucp does not serve there: a URL (``s3://...``) given where a local path is taken.
    Refused, never reinterpreted as a local path."""


class FormatError(UcpError):
    """A file does not follow its format spec (wrong version, missing field, escaping path)."""


class CorruptCheckpointError(UcpError):
    """Bytes on storage do not match their recorded checksum or length."""

    exit_code = 3


class CheckpointNotFoundError(UcpError, FileNotFoundError):
    """The path or step asked for holds no complete checkpoint."""

    exit_code = 2


class CheckpointDeletedError(CheckpointNotFoundError):
    """A checkpoint was deleted (by retention, its manifest first) while it was being read: a file
    it lists is gone and so is its ``manifest.json``. Not corruption: load another checkpoint."""


class ReplicaDivergenceError(UcpError):
    """Ranks that must hold identical copies of a tensor hold different bytes."""


class CaptureError(UcpError):
    """The training state cannot be flattened (unsupported value, shape that contradicts its layout)."""


class LoadError(UcpError):
    """A checkpoint cannot be applied to the current model and optimizer."""


class PeerLostError(UcpError):
    """A collective of the job's process group failed in its transport (gloo, NCCL): a peer rank
    died or its connection broke. The process group cannot be used any more."""


class DistributedError(UcpError):
    """One or more ranks failed a named phase; carries ``{rank: message}`` and is raised on every rank."""

    def __init__(self, phase: str, failures: dict[int, str]):
        self.phase = phase
        self.failures = dict(sorted(failures.items()))
        first_rank, first = next(iter(self.failures.items()))
        more = f" (and {len(self.failures) - 1} more rank(s))" if len(self.failures) > 1 else ""
        super().__init__(f"phase '{phase}' failed on rank {first_rank}: {first}{more}")


class NotInMemoryError(UcpError):
    """A load from memory only (``Checkpointer.load(memory_only=True)``) found no snapshot in the
    agents' memory that restores the job (more nodes lost than parity, say); nothing was read."""


class RecoveryFallbackError(UcpError):
    """In-process recovery cannot go on (too many ranks lost, the store lost, a snapshot memory
    cannot restore): the process should exit so the launcher relaunches the job, which resumes from
    the newest complete checkpoint. The message says why."""


class StorageError(UcpError):
    """Storage refused a write or a rename (disk full, permissions), or an object store a request
    (unreachable after its retries); the message names the path or URL."""


class LeaseError(UcpError):
    """Another job holds the checkpoint root's writer lease (or took it over from this one)."""


class PersistError(UcpError):
    """The agent could not write a snapshot to the durable tier; the snapshot stays in memory."""


class AgentError(UcpError):
    """The snapshot agent is not running, not answering, or refused a request."""


class ParityError(UcpError):
    """Parity could not be computed, or a lost snapshot could not be rebuilt from it."""


class RedundancyError(UcpError):
    """A redundancy layout that cannot be formed (too few nodes for the parity asked)."""


class ErasureError(UcpError):
    """An erasure code cannot do what was asked (ISA-L missing, too many stripes lost)."""


class TooManyLostError(ErasureError):
    """More stripes of a stripe set are lost than its code can rebuild.

    Attributes:
        lost: the indices of the lost stripes (data ``0..k-1``, parity ``k..k+m-1``).
        m: the most the code rebuilds.
    """

    def __init__(self, code, lost):
        self.lost = tuple(lost)
        self.m = code.m
        super().__init__(
            f"{len(self.lost)} of the {code.n} stripes of {code} are lost (stripes {few(list(self.lost))}); "
            f"it rebuilds at most {code.m}")


class UclError(SpecError):
    """A UCL program is malformed or meaningless; the message starts with ``file:line:column``."""

    def __init__(self, message: str, file: str = "<ucl>", line: int = 0, column: int = 0):
        self.file, self.line, self.column = file, line, column
        super().__init__(f"{file}:{line}:{column}: {message}")
