#!/usr/bin/env python
"""Encode and decode speed of ucp's erasure codes (``ucp.codecs.erasure``) next to memcpy, on one core.

The data: ``--total-mb`` MB (10^6 bytes) of random bytes in one 64-byte-aligned buffer, cut into
stripe sets of ``k`` data stripes of ``--stripe-kb`` KiB each (default 1024: ``STRIPE_BYTES``, the
stripe the system encodes, sends and checksums in; see docs/erasure.md); the data is rounded down
to a whole number of stripe sets of each code. Every figure is single-threaded (numpy's copy and
XOR, ISA-L's ``ec_encode_data`` on the calling thread), so it is a per-core speed, and counts
*data* bytes per second (``k`` stripes per stripe set), in GB/s (10^9 bytes). For each code,
XOR(4+1), RS(4+2) and RS(8+2) (Reed-Solomon: ISA-L's Cauchy matrix, through ctypes):

* **encode**: ``code.encode(data_stripes, parity)`` for every stripe set, the parity written into
  buffers preallocated (and touched) before the timing, distinct per stripe set as the system keeps
  them;
* **decode**: ``code.decode(stripes, out)`` for every stripe set with its first ``m`` data stripes
  lost, rebuilt from the other ``k`` stripes into preallocated buffers. After the timings every
  rebuilt stripe is compared with the original (``verified``), so no code can be timed doing
  nothing or the wrong thing.

For scale, ``memcpy_gbps``: ``np.copyto`` of the whole buffer into a preallocated, touched one (the
same bytes as the data of the codes). ``pyeclib_api_rs82_encode_gbps``: pyeclib's own Python API
(``ECDriver(k=8, m=2, ec_type="isa_l_rs_cauchy").encode(bytes)``, the same ISA-L code) over the same
stripe sets; it allocates its fragments afresh on every call, which is why ucp calls ISA-L directly
(its speed depends on glibc's allocator settings: the ``MALLOC_*`` variables in effect are reported
in ``malloc_env``). Its parity must be byte-equal to ucp's (``pyeclib_parity_matches``).

Each figure is the best of ``--repeats`` timed rounds, after one untimed warm-up round (which also
builds ISA-L's tables); within a round the measurements run one after the other.

Output: exactly one JSON line on stdout, progress on stderr; on any failure nothing on stdout and a
non-zero exit. Ratios ``*_over_memcpy`` divide by ``memcpy_gbps``. Targets (issue 7):
``target_xor_met``: XOR encode and decode >= 0.5x memcpy; ``target_rs82_encode_met``: RS(8+2)
encode >= 4 GB/s (per core).

    python tools/bench_erasure.py [--stripe-kb 1024] [--total-mb 256] [--repeats 5]
"""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import benchlib

CODES = (("xor", 4, 1), ("rs42", 4, 2), ("rs82", 8, 2))
TARGET_XOR_OVER_MEMCPY = 0.5
TARGET_RS82_ENCODE_GBPS = 4.0
log = benchlib.logger("bench_erasure")


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


class Case:
    """One code over the stripe sets of the data: its buffers, preallocated once, and its timed calls."""

    def __init__(self, label: str, k: int, m: int, src, stripe: int):
        import numpy as np

        from ucp.codecs.erasure import empty_aligned, erasure_code

        self.label, self.code, self.stripe = label, erasure_code(k, m), stripe
        self.sets = len(src) // (k * stripe)
        if self.sets < 1:
            raise ValueError(f"--total-mb holds no stripe set of {self.code} with {stripe}-byte stripes")
        self.nbytes = self.sets * k * stripe
        self.data = [[src[(s * k + i) * stripe:(s * k + i + 1) * stripe] for i in range(k)] for s in range(self.sets)]
        parity = empty_aligned(self.sets * m * stripe)
        lost = empty_aligned(self.sets * m * stripe)
        parity.fill(0)  # touched: page faults are not the code's
        lost.fill(0)
        self.parity = [[parity[(s * m + j) * stripe:][:stripe] for j in range(m)] for s in range(self.sets)]
        self.out = [{i: lost[(s * m + i) * stripe:][:stripe] for i in range(m)} for s in range(self.sets)]
        self.np = np

    def encode(self) -> None:
        for data, parity in zip(self.data, self.parity):
            self.code.encode(data, parity)

    def decode(self) -> None:
        m = self.code.m
        for data, parity, out in zip(self.data, self.parity, self.out):
            self.code.decode([None] * m + data[m:] + parity, out)

    def verify(self) -> None:
        """Every rebuilt stripe equals its original (the parity was right, and the rebuild too)."""
        for s, (data, out) in enumerate(zip(self.data, self.out)):
            for i, got in out.items():
                if not self.np.array_equal(got, data[i]):
                    raise RuntimeError(f"{self.code}: stripe set {s}, data stripe {i} was not rebuilt exactly")


def pyeclib_case(case: Case):
    """pyeclib's Python API over the stripe sets of ``case``: (encode all, parity of the first set as
    byte strings); None without pyeclib."""
    try:
        from pyeclib.ec_iface import ECDriver
    except ImportError:
        return None
    driver = ECDriver(k=case.code.k, m=case.code.m, ec_type="isa_l_rs_cauchy")
    blobs = [b"".join(bytes(s) for s in data) for data in case.data]  # outside the timing

    def encode():
        for blob in blobs:
            driver.encode(blob)

    def first_parity() -> list[bytes]:
        fragments = driver.encode(blobs[0])
        header = len(fragments[0]) - case.stripe  # liberasurecode's fragment header
        return [bytes(f[header:]) for f in fragments[case.code.k:]]

    return encode, first_parity


def best_gbps(nbytes: int, seconds: list[float]) -> float:
    return round(nbytes / min(seconds) / 1e9, 3)


def bench(args) -> dict:
    import numpy as np

    from ucp.codecs.erasure import empty_aligned
    from ucp.codecs.isal import isal

    lib = isal()
    if lib is None:
        raise RuntimeError("no ISA-L library: the Reed-Solomon codes cannot run (pip install pyeclib)")
    stripe = args.stripe_kb * 1024
    total = int(args.total_mb * 1e6)
    log(f"ISA-L {lib.version} at {lib.path}; stripe {stripe} B, data {total / 1e6:.0f} MB, "
        f"{args.repeats} repeats, one thread")
    src = empty_aligned(total)
    src[:] = np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8)
    dst = empty_aligned(total)
    dst.fill(0)
    cases = [Case(label, k, m, src, stripe) for label, k, m in CODES]
    rs82 = next(c for c in cases if c.label == "rs82")
    pyeclib = pyeclib_case(rs82)

    timed = {"memcpy": (total, lambda: np.copyto(dst, src))}
    for c in cases:
        timed[f"{c.label}_encode"] = (c.nbytes, c.encode)
        timed[f"{c.label}_decode"] = (c.nbytes, c.decode)
    if pyeclib is not None:
        timed["pyeclib_api_rs82_encode"] = (rs82.nbytes, pyeclib[0])
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for round_ in range(args.repeats + 1):
        for name, (nbytes, fn) in timed.items():
            t = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t
            if round_:  # round 0 warms up
                samples[name].append(seconds)
        if round_:
            log(f"round {round_}: " + ", ".join(f"{n} {timed[n][0] / samples[n][-1] / 1e9:.2f}" for n in timed)
                + " GB/s")

    if not np.array_equal(dst, src):
        raise RuntimeError("memcpy: the copy differs from its source")
    for c in cases:
        c.verify()
    (xor_parity,) = cases[0].parity[0]
    if not np.array_equal(xor_parity, np.bitwise_xor.reduce(np.stack(cases[0].data[0]), axis=0)):
        raise RuntimeError("XOR parity is not the XOR of the data stripes")

    out = {"stripe_kb": args.stripe_kb, "stripe_bytes": stripe, "total_mb": args.total_mb, "repeats": args.repeats,
           "threads": 1}
    out.update({f"{name}_gbps": best_gbps(nbytes, samples[name]) for name, (nbytes, _) in timed.items()})
    out["pyeclib_api_rs82_encode_gbps"] = out.get("pyeclib_api_rs82_encode_gbps")
    out["pyeclib_parity_matches"] = None if pyeclib is None else pyeclib[1]() == [bytes(p) for p in rs82.parity[0]]
    for c in cases:
        out[f"{c.label}_code"] = str(c.code)
        out[f"{c.label}_bytes"] = c.nbytes
    memcpy = out["memcpy_gbps"]
    for name in ("xor_encode", "xor_decode", "rs42_encode", "rs42_decode", "rs82_encode", "rs82_decode"):
        out[f"{name}_over_memcpy"] = round(out[f"{name}_gbps"] / memcpy, 3)
    out["target_xor_met"] = min(out["xor_encode_over_memcpy"], out["xor_decode_over_memcpy"]) >= TARGET_XOR_OVER_MEMCPY
    out["target_rs82_encode_met"] = out["rs82_encode_gbps"] >= TARGET_RS82_ENCODE_GBPS
    if out["pyeclib_parity_matches"] is False:
        raise RuntimeError("pyeclib's isa_l_rs_cauchy parity differs from ucp's for the same data")
    out["verified"] = True
    out.update({
        "isal": lib.path, "isal_version": lib.version, "numpy": np.__version__, "torch": package_version("torch"),
        "pyeclib": package_version("pyeclib"), "python": platform.python_version(), "cpu": cpu_model(),
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
    })
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def parse_args(argv=None):
    ap = benchlib.parser(__doc__)
    ap.add_argument("--stripe-kb", type=int, default=1024,
                    help="stripe length in KiB (default 1024: the system's STRIPE_BYTES); a multiple of 64 bytes")
    ap.add_argument("--total-mb", type=float, default=256.0, help="data per measurement, MB (1e6 bytes)")
    benchlib.add_repeats(ap, 5, "timed rounds (each figure is the best)")
    args = ap.parse_args(argv)
    if args.stripe_kb < 1 or args.total_mb <= 0 or args.repeats < 1:
        ap.error("--stripe-kb and --repeats must be >= 1, --total-mb > 0")
    if args.total_mb * 1e6 < 8 * args.stripe_kb * 1024:
        ap.error(f"--total-mb {args.total_mb} holds no RS(8+2) stripe set of 8 x {args.stripe_kb} KiB")
    return args


def main(argv=None) -> int:
    return benchlib.finish(benchlib.attempt(bench, parse_args(argv), log=log))


if __name__ == "__main__":
    sys.exit(main())
