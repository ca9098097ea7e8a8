"""Damaged checkpoints: flipped bytes, truncated and missing files, edited and malformed manifests
are detected and named; a failed load leaves an older checkpoint loadable."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import ucp
from tests.checkpoint.common import (FAST, as_format_1_2, fresh_checkpointer, make, saved_checkpoint, train_step,
                                     write_signed)
from tests.helpers import assert_bits_equal, flip_byte
from ucp.errors import CorruptCheckpointError, FormatError
from ucp.storage import directory as store
from ucp.storage.manifest_io import read_manifest
from ucp.storage.safetensors_file import header_checksum, read_header


def _fragment(path, key: str):
    frags = [f for f in read_manifest(path).fragments if f.key == key]
    assert len(frags) == 1
    return frags[0]


def test_flipped_byte_in_fragment_raises_corrupt_naming_file_and_key(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    f = _fragment(path, "model/fc1.weight")
    data_file = path / f.file
    flip_byte(data_file, f.offset + f.length // 2, 0x01)
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError) as e:
        ckpt.load()
    msg = str(e.value)
    assert str(data_file) in msg and "model/fc1.weight" in msg and "checksum" in msg


def test_failed_load_is_named_and_an_older_checkpoint_restores_exactly(ckpt_root):
    # Reads go straight into the live tensors (no bounce copy), so a load that fails its checksum
    # leaves the model unspecified (docs/format-checkpoint.md rule 16); the documented way on is to
    # load another checkpoint, which must then restore every bit.
    model, opt, sched = make()
    for _ in range(3):
        train_step(model, opt, sched)
    ck = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, options=FAST)
    ck.save(4)
    good = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, opt, sched)
    ck.save(5)
    f = _fragment(store.step_dir(ckpt_root, 5), "model/fc2.weight")
    flip_byte(store.step_dir(ckpt_root, 5) / f.file, f.offset, 0x40)
    ckpt, fresh = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError, match="model/fc2.weight") as e:
        ckpt.load()
    assert f.file in str(e.value) and "step_00000005" in str(e.value)
    assert ckpt.load(step=4).step == 4
    for n, p in fresh.named_parameters():
        assert_bits_equal(p, good[n], n)


def test_flipped_byte_in_optimizer_state_is_detected_too(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    f = _fragment(path, "optim/fc2.weight/exp_avg_sq")
    flip_byte(path / f.file, f.offset + f.length - 1, 0x80)
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError, match="optim/fc2.weight/exp_avg_sq"):
        ckpt.load()


def test_truncated_rank_file_raises_corrupt_naming_file_and_key(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    frags = read_manifest(path).fragments
    last = max(frags, key=lambda f: f.offset)
    data_file = path / last.file
    os.truncate(data_file, last.offset + last.length - 1)
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError) as e:
        ckpt.load()
    msg = str(e.value)
    assert str(data_file) in msg and last.key in msg and "truncated" in msg


def test_rank_file_truncated_to_its_header_raises_corrupt(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    m = read_manifest(path)
    data_file = path / m.fragments[0].file
    _, data_start = read_header(data_file)
    os.truncate(data_file, data_start)
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError) as e:
        ckpt.load()
    assert str(data_file) in str(e.value)
    assert any(f.key in str(e.value) for f in m.fragments)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_corrupt_fragment_table_raises_corrupt(ckpt_root, version):
    path, *_ = saved_checkpoint(ckpt_root)
    name = legacy(path, version) or store.FRAGMENT_PAGES
    table = path / name
    flip_byte(table, table.stat().st_size // 2, 0xFF)
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError, match=name):
        ckpt.load()


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_missing_fragment_table_raises_corrupt(ckpt_root, version):
    path, *_ = saved_checkpoint(ckpt_root)
    (path / (legacy(path, version) or store.FRAGMENT_PAGES)).unlink()
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError, match="missing"):
        ckpt.load()


def test_a_missing_or_damaged_state_table_is_named(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    table = path / store.STATE_PAGES
    flip_byte(table, 3, 0x10)
    with pytest.raises(CorruptCheckpointError, match=f"{table}: .*checksum mismatch"):
        fresh_checkpointer(ckpt_root)[0].load()
    table.unlink()
    with pytest.raises(CorruptCheckpointError, match=f"{table}: state table is missing"):
        fresh_checkpointer(ckpt_root)[0].load()


def legacy(path, version: str) -> str | None:
    """Rewrite the checkpoint as ``version`` 1.2 (its fragment table's name), or leave it (None)."""
    if version == "1.3":
        return None
    as_format_1_2(path)
    return store.FRAGMENT_TABLE


def test_deleted_data_file_raises_naming_it(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    data_file = path / store.rank_file(0)
    data_file.unlink()
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError) as e:
        ckpt.load()
    assert str(data_file) in str(e.value) and "missing" in str(e.value)


def test_manifest_from_a_newer_major_version_asks_to_upgrade(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    mpath = path / store.MANIFEST
    header = json.loads(mpath.read_bytes())
    header["format_version"] = "9.0"
    write_signed(mpath, header)
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(FormatError, match="upgrade") as e:
        ckpt.load()
    assert "9.0" in str(e.value)


def test_manifest_newer_minor_version_still_loads(ckpt_root):
    path, model, *_ = saved_checkpoint(ckpt_root)
    mpath = path / store.MANIFEST
    header = json.loads(mpath.read_bytes())
    header["format_version"] = "1.7"
    header["a_field_from_the_future"] = {"x": [1, 2]}  # readers ignore fields they do not know
    write_signed(mpath, header)
    ckpt, model2 = fresh_checkpointer(ckpt_root)
    assert ckpt.load().step == 5
    assert_bits_equal(model2.fc1.weight, model.fc1.weight)


@pytest.mark.parametrize("version, words", [("1.2", "plain file name"),
                                             ("1.3", "lacks a valid 'fragment_table' entry .*names fragments.pages")])
def test_manifest_naming_a_file_outside_the_directory_is_rejected(ckpt_root, version, words):
    path, *_ = saved_checkpoint(ckpt_root)
    name = legacy(path, version) or store.FRAGMENT_PAGES
    (ckpt_root / "evil.parquet").write_bytes((path / name).read_bytes())
    mpath = path / store.MANIFEST
    header = json.loads(mpath.read_bytes())
    header["fragment_table"]["file"] = "../evil.parquet"
    write_signed(mpath, header)
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(FormatError, match=words):
        ckpt.load()


def test_loader_finds_fragments_by_offset_not_by_safetensors_name(ckpt_root):
    # Format rule 18: the fragment table, not the safetensors header, says where bytes are.
    import dataclasses

    from ucp.storage.manifest_io import commit_manifest

    path, model, *_ = saved_checkpoint(ckpt_root)
    data_file = path / store.rank_file(0)
    raw = data_file.read_bytes()
    (n,) = np.frombuffer(raw[:8], dtype="<u8")
    head = raw[8:8 + int(n)].replace(b'"model/', b'"MODEL/').replace(b'"optim/', b'"OPTIM/')
    assert len(head) == n
    data_file.write_bytes(raw[:8] + head + raw[8 + int(n):])
    m = read_manifest(path)  # a writer that means the new names records their checksum
    commit_manifest(path, dataclasses.replace(m, file_headers={**m.file_headers,
                                                               data_file.name: header_checksum(data_file)}))
    ckpt, fresh = fresh_checkpointer(ckpt_root)
    assert ckpt.load().step == 5
    assert_bits_equal(fresh.fc1.weight, model.fc1.weight)


def test_manifest_that_is_not_json_raises_format_error(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    (path / store.MANIFEST).write_bytes(b"{not json")
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(FormatError, match="JSON"):
        ckpt.load()


def test_a_changed_value_in_the_manifest_is_caught_by_its_checksum(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    mpath = path / store.MANIFEST
    text = mpath.read_text()
    assert '"step": 5' in text
    mpath.write_text(text.replace('"step": 5', '"step": 6'))  # still valid JSON, still a valid manifest
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError, match="manifest.json: checksum mismatch"):
        ckpt.load()


@pytest.mark.parametrize("version, edit, words", [
    ("1.2", lambda h: h.update(files=["abc"]), "malformed"),
    ("1.2", lambda h: h["state"].update(ranks=[1, 2]), "'ranks' map rank numbers"),
    ("1.2", lambda h: h["state"]["ranks"].update({"7": {}}), "'ranks' map rank numbers"),
    ("1.3", lambda h: h.update(format_version="1"), "MAJOR.MINOR"),
    ("1.3", lambda h: h["fragment_table"].update(root={"offset": -1}), "malformed page reference"),
    ("1.3", lambda h: h["state_table"].update(depth="deep"), "entry for this table is malformed"),
    ("1.3", lambda h: h.pop("state_table"), "lacks a valid 'state_table' entry"),
])
def test_malformed_manifests_get_a_format_error(ckpt_root, version, edit, words):
    path, *_ = saved_checkpoint(ckpt_root)
    legacy(path, version)
    mpath = path / store.MANIFEST
    header = json.loads(mpath.read_bytes())
    edit(header)
    write_signed(mpath, header)
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(FormatError, match=words):
        ckpt.load()


def test_nan_in_the_manifest_is_not_json(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    mpath = path / store.MANIFEST
    mpath.write_text(mpath.read_text().replace('"step": 5', '"step": NaN'))
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(FormatError, match="not valid JSON"):
        ckpt.load()


# --- issue 17, item 5: the rank files' safetensors headers are covered by the manifest (format 1.2)

def _header_span(data_file) -> tuple[bytes, int]:
    raw = data_file.read_bytes()
    (n,) = np.frombuffer(raw[:8], dtype="<u8")
    return raw, 8 + int(n)


def _swap_two_same_size_offsets(data_file) -> tuple[str, str]:
    """Swap the ``data_offsets`` of two same-size tensors in the file's header, its length kept."""
    raw, end = _header_span(data_file)
    head = json.loads(raw[8:end])
    by_size: dict = {}
    for name, entry in head.items():
        if name != "__metadata__":
            b, e = entry["data_offsets"]
            by_size.setdefault(e - b, []).append(name)
    a, b = next(names for size, names in by_size.items() if len(names) >= 2 and size)[:2]
    text = raw[8:end].decode()
    oa, ob = (json.dumps(head[x]["data_offsets"], separators=(",", ":")) for x in (a, b))
    assert text.count(oa) == 1 and text.count(ob) == 1
    swapped = text.replace(oa, "\0").replace(ob, oa).replace("\0", ob).encode()
    assert len(swapped) == end - 8 and swapped != raw[8:end]
    data_file.write_bytes(raw[:8] + swapped + raw[end:])
    return a, b


@pytest.mark.parametrize("damage", ["flip", "swap"])
def test_a_damaged_rank_file_header_is_named_by_verify_and_load(ckpt_root, damage):
    from ucp.storage.verify import verify_checkpoint

    path, *_ = saved_checkpoint(ckpt_root)
    data_file = path / store.rank_file(0)
    if damage == "flip":
        _, end = _header_span(data_file)
        flip_byte(data_file, end // 2, 0x01)  # a byte in the middle of the JSON header
    else:
        _swap_two_same_size_offsets(data_file)  # a third-party reader would return the wrong tensors
    report = verify_checkpoint(path, read_manifest(path))
    assert not report.ok and len(report.problems) == 1
    assert str(data_file) in report.problems[0] and "header fails its checksum" in report.problems[0]
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError) as e:
        ckpt.load()
    msg = str(e.value)
    assert msg.startswith(f"{data_file}: safetensors header fails its checksum") and "\n" not in msg


def test_the_manifest_records_every_rank_files_header_checksum(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    m = read_manifest(path)
    assert m.format_version == "1.3" and set(m.file_headers) == set(m.files)
    for name, crc in m.file_headers.items():
        assert crc == header_checksum(path / name)


def test_a_format_1_1_manifest_without_header_checksums_loads_and_verify_says_they_are_unchecked(ckpt_root):
    from ucp.storage.verify import verify_checkpoint

    path, model, *_ = saved_checkpoint(ckpt_root)
    legacy(path, "1.2")
    mpath = path / store.MANIFEST
    header = json.loads(mpath.read_bytes())
    header["format_version"] = "1.1"
    del header["file_headers"]
    write_signed(mpath, header)
    report = verify_checkpoint(path, read_manifest(path))
    assert report.ok and report.notes and "headers are unchecked" in report.notes[0] and "1.1" in report.notes[0]
    ckpt, fresh = fresh_checkpointer(ckpt_root)
    assert ckpt.load().step == 5
    assert_bits_equal(fresh.fc1.weight, model.fc1.weight)


def test_a_format_1_2_manifest_lacking_a_files_header_checksum_is_refused(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    legacy(path, "1.2")
    mpath = path / store.MANIFEST
    header = json.loads(mpath.read_bytes())
    header["file_headers"] = {}
    write_signed(mpath, header)
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(FormatError, match=f"{mpath}: format 1.2 records the header checksum of every data file"):
        ckpt.load()


# --- issue 17, item 9: the step a manifest holds is its directory's, and an int64


@pytest.mark.parametrize("step, words", [(6, "holds step 6, but its directory step_00000005 is step 5"),
                                         (10 ** 30, "manifest step 1000000000000000000000000000000 must be")])
def test_a_manifest_step_other_than_its_directory_or_absurd_is_refused_naming_it(ckpt_root, step, words):
    path, *_ = saved_checkpoint(ckpt_root)
    mpath = path / store.MANIFEST
    header = json.loads(mpath.read_bytes())
    header["step"] = step
    write_signed(mpath, header)
    for call in (lambda: read_manifest(path), lambda: fresh_checkpointer(ckpt_root)[0].load(step=5)):
        with pytest.raises(FormatError) as e:
            call()
        assert str(e.value).startswith(f"{mpath}: ") and words in str(e.value) and "\n" not in str(e.value)


# --- issue 17, item 7: declared sizes are checked against the files before they drive an allocation


def forbid_huge_allocations(monkeypatch) -> None:
    """``torch.empty`` of 2^28 elements or more fails the test."""
    import torch

    real_empty = torch.empty

    def bounded_empty(*shape, **kw):
        dims = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        assert np.prod([int(d) for d in dims], dtype=object) < 1 << 28, f"allocation of {dims} elements"
        return real_empty(*shape, **kw)

    monkeypatch.setattr(torch, "empty", bounded_empty)


def test_a_resigned_manifest_declaring_a_huge_tensor_is_refused_before_allocating(ckpt_root, monkeypatch):
    import dataclasses

    from ucp.format.box import Box
    from ucp.format.fragment import Fragment
    from ucp.format.manifest import TensorMeta
    from ucp.storage.manifest_io import commit_manifest

    path, *_ = saved_checkpoint(ckpt_root)
    m = read_manifest(path)
    name = store.rank_file(0)
    numel = 1 << 33  # 32 GiB of float32, in a file of a few KiB
    big = Fragment("extra/big", Box((0,), (numel,)), None, "float32", 0, name, 8, 4 * numel, 0, ())
    crafted = dataclasses.replace(m, tensors={**m.tensors, "extra/big": TensorMeta((numel,), "float32")},
                                  fragments=m.fragments + (big,), files={**m.files, name: 8 + 4 * numel})
    crafted.validate()
    commit_manifest(path, crafted)  # fragment table and manifest re-signed: only the sizes tell
    forbid_huge_allocations(monkeypatch)
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError) as e:
        ckpt.load()
    msg = str(e.value)
    assert msg.startswith(f"{path / name}: ") and f"the manifest records {8 + 4 * numel}" in msg
    assert "extra/big" in msg and "truncated" in msg


def test_a_file_of_another_size_than_recorded_is_refused_when_opened(ckpt_root):
    from ucp.storage.fragment_files import FragmentFiles

    path, *_ = saved_checkpoint(ckpt_root)
    m = read_manifest(path)
    name = store.rank_file(0)
    with open(path / name, "ab") as f:
        f.write(b"\0" * 16)  # longer: overwritten by something else
    with FragmentFiles(path, manifest=m) as files, pytest.raises(CorruptCheckpointError) as e:
        files.open(name)
    assert str(e.value).startswith(f"{path / name}: {m.files[name] + 16} bytes on storage, the manifest records {m.files[name]}")
    with FragmentFiles(path) as files:  # (without a manifest: nothing to compare with)
        assert files.open(name)[1] == m.files[name] + 16


def test_a_resigned_manifest_declaring_a_tensor_larger_than_its_fragments_is_refused_before_allocating(
        ckpt_root, monkeypatch):
    import dataclasses

    from ucp.format.box import Box
    from ucp.format.fragment import Fragment
    from ucp.format.manifest import TensorMeta
    from ucp.storage.manifest_io import commit_manifest

    path, *_ = saved_checkpoint(ckpt_root)
    m = read_manifest(path)
    small = Fragment("extra/big", Box((0,), (2,)), None, "float32", 0, store.rank_file(0), 8, 8, 0, ())
    commit_manifest(path, dataclasses.replace(m, tensors={**m.tensors, "extra/big": TensorMeta((1 << 33,), "float32")},
                                              fragments=m.fragments + (small,)))  # (a table of 1.3 is not validated whole on writing)
    forbid_huge_allocations(monkeypatch)
    with pytest.raises(FormatError, match="extra/big: fragments hold 2 elements, the tensor has 8589934592"):
        fresh_checkpointer(ckpt_root)[0].load()
