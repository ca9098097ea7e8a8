"""Fresh load destinations on huge pages (ucp.state.pages): a large CPU tensor's pages are advised
(the kernel marks its mapping ``hg``), a small one's are not, and a load into a fresh optimizer
creates its moments that way."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import ucp
from ucp.state import pages
from tests.helpers import same_state, state_of, tiny_model, train_step

pytestmark = pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").is_dir(),
                                reason="a kernel without transparent huge pages: the advice does nothing there")


def advised(t: torch.Tensor) -> bool:
    """Whether the mapping holding ``t``'s middle byte carries VM_HUGEPAGE (``hg`` in smaps)."""
    addr = t.untyped_storage().data_ptr() + t.untyped_storage().nbytes() // 2
    start = end = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            start, end = int(m[1], 16), int(m[2], 16)
        elif line.startswith("VmFlags:") and start is not None and start <= addr < end:
            return "hg" in line.split()
    raise AssertionError(f"no mapping holds {addr:#x}")


def test_a_large_cpu_tensor_is_advised_a_small_one_is_not(monkeypatch):
    calls = []
    real = pages.advise_huge
    monkeypatch.setattr(pages, "advise_huge", lambda t: calls.append(t.nbytes) or real(t))
    big = pages.empty((pages.MIN_BYTES // 4 + 1000,), torch.float32)
    pages.empty((1000,), torch.float32)  # (its memory may lie in pages advised before: not asked here)
    assert big.shape == (pages.MIN_BYTES // 4 + 1000,) and big.dtype == torch.float32
    assert calls == [big.nbytes] and advised(big)
    big.fill_(1.5)  # (usable as any tensor)
    assert float(big.sum()) == 1.5 * big.numel()


def test_advise_huge_counts_only_whole_aligned_huge_pages():
    t = torch.empty(3 * pages.HUGE_PAGE, dtype=torch.uint8)
    n = pages.advise_huge(t)
    assert n % pages.HUGE_PAGE == 0 and 2 * pages.HUGE_PAGE <= n <= 3 * pages.HUGE_PAGE
    assert pages.advise_huge(torch.empty(pages.HUGE_PAGE // 2, dtype=torch.uint8)) == 0


def test_a_load_creates_a_fresh_optimizers_moments_on_huge_pages(tmp_path):
    sizes = (1024, 4096)  # a weight of 16 MiB: its moments are large enough
    model, opt = tiny_model(sizes=sizes)
    train_step(model, opt, 1)
    ucp.Checkpointer(tmp_path, model=model, optimizer=opt).save(1)
    fresh, fresh_opt = tiny_model(seed=1, sizes=sizes)
    ucp.Checkpointer(tmp_path, model=fresh, optimizer=fresh_opt).load()
    assert same_state(state_of(fresh, fresh_opt), state_of(model, opt))
    weight = fresh[0].weight
    assert advised(fresh_opt.state[weight]["exp_avg"]) and advised(fresh_opt.state[weight]["exp_avg_sq"])
