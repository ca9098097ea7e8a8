"""``ucp verify`` and :func:`ucp.storage.verify.verify_checkpoint` check the rank files' safetensors
headers against the checksums the manifest records (format 1.2, issue 17 item 5), and say when a
1.1 manifest records none; the memory tier's durable copies record them too."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.checkpoint.common import as_format_1_2, saved_checkpoint, write_signed
from tests.helpers import flip_byte, one_rank_snapshot
from ucp.snapshot import persist
from ucp.storage import directory as store
from ucp.storage.manifest_io import read_manifest
from ucp.storage.safetensors_file import header_checksum
from ucp.storage.verify import verify_checkpoint


def _ucp(*args):
    return subprocess.run([sys.executable, "-m", "ucp.cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_verify_names_a_rank_file_whose_header_length_was_flipped(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    data_file = path / store.rank_file(0)
    flip_byte(data_file, 6, 0x01)  # the header length: now beyond any plausible header
    report = verify_checkpoint(path, read_manifest(path))
    assert len(report.problems) == 1 and report.problems[0].startswith(f"{data_file}: header length")
    p = _ucp("verify", ckpt_root, "--quiet")
    assert p.returncode == 3 and str(data_file) in p.stderr and "Traceback" not in p.stderr


def test_verify_cli_passes_a_1_2_checkpoint_and_notes_unchecked_headers_of_a_1_1_one(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    p = _ucp("verify", ckpt_root, "--quiet")
    assert p.returncode == 0 and p.stdout.startswith("OK ") and "NOTE" not in p.stdout, p.stderr
    as_format_1_2(path)
    p = _ucp("verify", ckpt_root, "--quiet")
    assert p.returncode == 0 and p.stdout.startswith("OK ") and "NOTE" not in p.stdout, p.stderr
    mpath = path / store.MANIFEST
    header = json.loads(mpath.read_bytes())
    header["format_version"] = "1.1"
    del header["file_headers"]
    write_signed(mpath, header)
    p = _ucp("verify", ckpt_root, "--quiet")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("OK ") and lines[1] == (f"NOTE {path}: the data files' safetensors headers are "
                                                       "unchecked: a format 1.1 manifest records no checksums of them (1.2 does)")


def test_the_memory_tiers_durable_copy_records_its_rank_files_header_checksums(tmp_path):
    raw, header = one_rank_snapshot()
    directory = store.step_dir(tmp_path, 5)
    assert persist.prepare(directory)
    persist.write_rank(directory, header, raw, [0], token=111)
    assert persist.commit_when_written(directory, tmp_path, 5, 1, token=111, keep=None, timeout=5)
    m = read_manifest(directory)
    name = store.rank_file(0)
    assert m.file_headers == {name: header_checksum(directory / name)}
    assert verify_checkpoint(directory, m).ok
    size = (directory / name).stat().st_size
    head_len = int(np.frombuffer((directory / name).read_bytes()[:8], dtype="<u8")[0])
    flip_byte(directory / name, 8 + head_len // 2, 0x02)
    report = verify_checkpoint(directory, m)
    assert (directory / name).stat().st_size == size and len(report.problems) == 1
    assert report.problems[0].startswith(f"{directory / name}: safetensors header fails its checksum")


@pytest.mark.parametrize("depth, ok", [(58, True), (70, False)])
def test_deep_typed_state_in_a_manifest_loads_or_is_refused_without_recursion_error(ckpt_root, depth, ok):
    # The manifest is parsed with bounded depth (ucp.format.jsonio); the typed-JSON decoder then walks
    # whatever that allowed: a value nested as deep as the limit lets decodes, one deeper is refused.
    import ucp
    from tests.checkpoint.common import fresh_checkpointer
    from ucp.errors import FormatError

    path, *_ = saved_checkpoint(ckpt_root)
    value: object = 1
    for i in range(depth):
        value = {"$tuple": [value]} if i % 2 else [value]
    mpath = path / store.MANIFEST
    header = json.loads(mpath.read_bytes())
    header["state"]["shared"]["extras"] = {"deep": value}
    write_signed(mpath, header)
    ckpt, _ = fresh_checkpointer(ckpt_root)
    if not ok:
        with pytest.raises(FormatError, match="nested deeper than 64 levels"):
            ckpt.load()
        return
    got = ckpt.load().extras["deep"]
    for _ in range(depth // 2):
        got = got[0][0]
    assert got == 1
    assert isinstance(ucp.Checkpointer, type)
