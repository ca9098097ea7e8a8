"""A snapshot's header: what a rank's slot holds (docs/agent.md section 4), read and written in one
place. Headers travel as JSON (to the agent, into rank files); :class:`FragmentRecord` is one
fragment of a header, and :func:`manifest_from_headers` turns the headers of one snapshot into the
:class:`~ucp.format.manifest.Manifest` every loader reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from ucp.errors import FormatError
from ucp.format.box import Box, FlatRange
from ucp.format.fragment import Fragment
from ucp.format.layout import Layout
from ucp.format.manifest import BLOCK_BYTES, Manifest, TensorMeta
from ucp.format.values import split_state
from ucp.plan.save_plan import PieceInfo, merge_metas


#: the snapshot header format this code writes and reads (docs/agent.md section 4); an agent
#: reports it, and a trainer refuses an agent of another
SNAPSHOT_FORMAT_VERSION = "1.1"
#: the block size of a snapshot's block checksums (format 1.1; 1.0 headers, without ``block_bytes``,
#: used the durable format's 64 KiB): one library call per MiB, so a snapshot's threads spend their
#: time in the checksum, not in taking turns for the interpreter between calls
SNAPSHOT_BLOCK_BYTES = 1 << 20


def block_bytes_of(header: dict) -> int:
    """The block size of ``header``'s block checksums: its ``block_bytes`` (format 1.1), or the 64 KiB
    of format 1.0 headers, which have none; FormatError for a size that is not a positive multiple
    of 4 KiB."""
    size = header.get("block_bytes", BLOCK_BYTES)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 4096:
        raise FormatError(f"snapshot header of rank {header.get('rank')}: block_bytes {size!r} must be a positive "
                          "multiple of 4096")
    return size


def one_block_size(sizes) -> int:
    """The one block size among a snapshot's headers' ``sizes`` (FormatError when they differ)."""
    sizes = sorted(set(sizes))
    if len(sizes) > 1:
        raise FormatError(f"the snapshot's headers disagree about their block size: {sizes} bytes")
    return sizes[0] if sizes else SNAPSHOT_BLOCK_BYTES


def common_block_bytes(headers) -> int:
    """The one block size of a snapshot's ``headers`` (FormatError when they differ)."""
    return one_block_size(block_bytes_of(h) for h in headers)


@dataclass(frozen=True)
class FragmentRecord:
    """One fragment of a snapshot header: the region ``box`` (and ``flat`` range) of tensor ``key``,
    ``length`` bytes of ``dtype``; once committed, where it lies (``file``, ``offset``) and its
    checksums (``crc32c``, ``blocks``)."""

    key: str
    box: Box
    flat: FlatRange | None
    dtype: str
    length: int
    file: str | None = None
    offset: int | None = None
    crc32c: int | None = None
    blocks: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        d = {"key": self.key, "offsets": list(self.box.offsets), "sizes": list(self.box.sizes),
             "flat": None if self.flat is None else [self.flat.start, self.flat.numel],
             "dtype": self.dtype, "length": self.length}
        if self.file is not None:
            d.update(file=self.file, offset=self.offset, crc32c=self.crc32c, blocks=list(self.blocks))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FragmentRecord":
        flat = None if d["flat"] is None else FlatRange(*d["flat"])
        box = Box(tuple(d["offsets"]), tuple(d["sizes"]))
        if "file" not in d:
            return cls(d["key"], box, flat, d["dtype"], d["length"])
        return cls(d["key"], box, flat, d["dtype"], d["length"], d["file"], d["offset"], d["crc32c"],
                   tuple(d["blocks"]))

    def piece_info(self) -> PieceInfo:
        """What the durable save plan needs of it (its region, size and checksum)."""
        return PieceInfo(self.key, self.box, self.flat, self.dtype, self.length, self.crc32c)

    def fragment(self, rank: int) -> Fragment:
        """The committed record as a checkpoint fragment held by ``rank``."""
        return Fragment(self.key, self.box, self.flat, self.dtype, rank, self.file, self.offset, self.length,
                        self.crc32c, self.blocks)


def restorable(headers: list[dict]) -> tuple[int, int] | None:
    """``(step, world size)`` of the newest snapshot of which every saving rank (``0 .. world_size
    - 1``) holds a committed header and at least one holds it complete, or None. ``headers`` may
    repeat and may mix snapshots of several steps and world sizes (after a recovery on fewer ranks,
    the agents may hold snapshots of both jobs, of the same step)."""
    by_step: dict[tuple[int, int], dict[int, dict]] = {}
    for h in headers:
        by_step.setdefault((h["step"], h["world_size"]), {})[h["rank"]] = h
    for step, world in sorted(by_step, reverse=True):
        ranks = by_step[(step, world)]
        if set(ranks) == set(range(world)) and any(h["complete"] for h in ranks.values()):
            return step, world
    return None


def manifest_from_headers(headers: list[dict], host: str, whole: bool = True) -> Manifest:
    """The snapshot of one step as a :class:`~ucp.format.manifest.Manifest` over the files its
    fragments name (``/dev/shm`` segments, or rank files): every rank's fragments (a region several
    ranks hold, from a rank on ``host`` when one has it), the tensors' metadata, the ranks' non-tensor
    state. ``whole=False``: the headers of some ranks only (a rank resuming from its own), whose
    fragments are checked one by one, not for covering every tensor; their state is theirs alone."""
    headers = sorted(headers, key=lambda h: (h["host"] != host, h["rank"]))  # local copies first
    tensors = merge_metas([{k: TensorMeta.from_dict(m, k) for k, m in h["tensors"].items()} for h in headers])
    fragments, seen, files = [], set(), {}
    for h in headers:
        for f in h["fragments"]:
            frag = FragmentRecord.from_dict(f).fragment(h["rank"])
            if frag.region in seen:
                continue
            seen.add(frag.region)
            fragments.append(frag)
            files[f["file"]] = h["file_size"]
    by_rank = sorted(headers, key=lambda h: h["rank"])
    state = split_state([h["state"] for h in by_rank]) if whole else \
        {"shared": {}, "ranks": {str(h["rank"]): h["state"] for h in by_rank}}
    manifest = Manifest(by_rank[0]["step"], Layout.from_dict(by_rank[0]["layout"]), tensors, tuple(fragments),
                        state, files, created_by=by_rank[0].get("created_by", ""),
                        block_bytes=common_block_bytes(headers))
    manifest.validate_header()
    manifest.validate_fragments(cover=whole)
    return manifest
