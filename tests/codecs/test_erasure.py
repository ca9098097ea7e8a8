"""XOR and Reed-Solomon erasure codes: any k of k + m stripes rebuild the rest, bit-exactly."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from functools import reduce

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ucp.codecs import erasure
from ucp.codecs.checksum import crc32c
from ucp.codecs.erasure import (
    MAX_STRIPES,
    ErasureCode,
    ReedSolomonCode,
    TooManyLostError,
    XorCode,
    drop_corrupt,
    empty_aligned,
    erasure_code,
    join,
    split,
    stripe_bytes,
)
from ucp.errors import FormatError, OptionsError

# m = 1 is XOR; m >= 5 is where a Vandermonde matrix would fail some patterns (Cauchy must not)
CODES = [(1, 1), (2, 1), (5, 1), (1, 2), (2, 2), (4, 2), (8, 2), (3, 3), (6, 4), (5, 5), (3, 6)]
few_examples = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def stripe_set(code: ErasureCode, data: bytes, align: int):
    """Data split into k stripes, and the m parity stripes encoded from them."""
    stripes = split(np.frombuffer(data, np.uint8), code.k, align)
    return stripes + code.encode(stripes)


def loss_patterns(n: int, up_to: int):
    return itertools.chain.from_iterable(itertools.combinations(range(n), r) for r in range(up_to + 1))


def test_the_factory_picks_xor_for_one_parity_stripe_and_reed_solomon_above():
    assert erasure_code(4, 1) == XorCode(4)
    assert erasure_code(4, 2) == ReedSolomonCode(4, 2)
    assert str(erasure_code(8, 2)) == "rs_cauchy(8+2)" and erasure_code(8, 2).n == 10


@pytest.mark.parametrize("k,m", CODES)
@few_examples
@given(data=st.binary(max_size=700), align=st.sampled_from([1, 8, 64]))
def test_every_loss_of_up_to_m_stripes_is_rebuilt_bit_exactly(k, m, data, align):
    code = erasure_code(k, m)
    stripes = stripe_set(code, data, align)
    want = [bytes(s) for s in stripes]
    for lost in loss_patterns(code.n, m):
        survivors = [None if i in lost else s for i, s in enumerate(stripes)]
        out = {i: np.full(len(want[0]), 0xA5, np.uint8) for i in lost}  # data and parity alike
        rebuilt = code.decode(survivors, out)
        assert sorted(rebuilt) == list(lost)
        assert all(bytes(rebuilt[i]) == want[i] for i in lost), lost
        data_back = [rebuilt.get(i, stripes[i]) for i in range(k)]
        assert bytes(join(data_back, len(data))) == data


@pytest.mark.parametrize("k,m", [(8, 5), (6, 6)])
def test_every_loss_of_m_stripes_decodes_where_a_vandermonde_matrix_would_not(k, m):
    """ISA-L's Vandermonde RS(8+5) and RS(6+6) have singular k x k submatrices (6 and 8 of them)."""
    code = erasure_code(k, m)
    data = np.random.default_rng(k + m).bytes(k * 64)
    stripes = stripe_set(code, data, 64)
    for lost in itertools.combinations(range(code.n), m):
        rebuilt = code.decode([None if i in lost else s for i, s in enumerate(stripes)])
        assert all(bytes(rebuilt[i]) == bytes(stripes[i]) for i in lost if i < k), lost


@pytest.mark.parametrize("k,m", [(2, 1), (4, 2), (5, 5)])
def test_more_than_m_lost_is_an_error_naming_the_count_and_the_limit(k, m):
    code = erasure_code(k, m)
    stripes = stripe_set(code, bytes(range(256)) * 3, 64)
    for lost in itertools.combinations(range(code.n), m + 1):
        with pytest.raises(TooManyLostError) as e:
            code.decode([None if i in lost else s for i, s in enumerate(stripes)])
        assert e.value.lost == lost and e.value.m == m
        assert f"{m + 1} of the {code.n} stripes of {code} are lost" in str(e.value)
        assert f"rebuilds at most {m}" in str(e.value)


def test_xor_parity_is_the_xor_of_the_data():
    rng = np.random.default_rng(0)
    data = [rng.integers(0, 256, 1000, dtype=np.uint8) for _ in range(5)]
    (parity,) = XorCode(5).encode(data)
    assert np.array_equal(parity, reduce(np.bitwise_xor, data))
    (mirror,) = XorCode(1).encode(data[:1])  # k = 1: the parity is a copy
    assert np.array_equal(mirror, data[0])


@pytest.mark.parametrize("k,m", [(4, 2), (8, 2), (3, 3), (6, 4), (5, 5)])
def test_parity_is_what_pyeclib_isa_l_rs_cauchy_writes(k, m):
    """The same standard Cauchy Reed-Solomon: pyeclib's fragments are an 80-byte header + our stripe."""
    ec_iface = pytest.importorskip("pyeclib.ec_iface")
    driver = ec_iface.ECDriver(k=k, m=m, ec_type="isa_l_rs_cauchy")
    data = np.random.default_rng(k * 10 + m).integers(0, 256, k * 4096, dtype=np.uint8)
    stripes = stripe_set(ReedSolomonCode(k, m), data.tobytes(), 64)
    fragments = driver.encode(data.tobytes())
    assert len(fragments) == k + m
    for i, fragment in enumerate(fragments):
        assert len(fragment) == 80 + 4096
        assert fragment[80:] == stripes[i].tobytes(), i


@pytest.mark.parametrize("k,m", [(3, 1), (4, 2), (5, 5)])
def test_reused_buffers_are_overwritten_with_the_same_result(k, m):
    code = erasure_code(k, m)
    rng = np.random.default_rng(1)
    parity = [empty_aligned(512) for _ in range(m)]
    out = {i: empty_aligned(512) for i in range(m)}  # the first m data stripes are lost
    for _ in range(3):  # new data into the same buffers: nothing of the last round may leak through
        data = [rng.integers(0, 256, 512, dtype=np.uint8) for _ in range(k)]
        fresh = code.encode(data)
        got = code.encode(data, parity)
        assert all(np.shares_memory(g, p) for g, p in zip(got, parity))
        assert all(np.array_equal(a, b) for a, b in zip(fresh, parity))
        for _ in range(2):
            rebuilt = code.decode([None] * m + data[m:] + parity, out)
            assert all(np.shares_memory(rebuilt[i], out[i]) for i in out)
            assert all(np.array_equal(out[i], data[i]) for i in out)


@pytest.mark.parametrize("k,m", [(4, 1), (4, 2)])
def test_stripes_longer_than_a_piece_and_at_any_alignment(k, m):
    code = erasure_code(k, m)
    n = erasure._PIECE + 100
    rng = np.random.default_rng(2)
    stripes = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(k)]
    reference = code.encode(stripes)
    backing = np.empty(k * (n + 64) + 64, np.uint8)
    for shift in (0, 1, 8, 33):
        data = [backing[shift + i * (n + 64):][:n] for i in range(k)]  # unaligned, in one block
        for d, s in zip(data, stripes):
            d[:] = s
        parity = code.encode(data)
        assert all(np.array_equal(p, r) for p, r in zip(parity, reference))
        out = {0: np.zeros(n + 1, np.uint8)[1:]}  # an unaligned output
        code.decode([None] + data[1:] + parity, out)
        assert np.array_equal(out[0], data[0])


def test_stripe_sets_encode_and_decode_on_several_threads_at_once():
    code = ReedSolomonCode(4, 2)
    rng = np.random.default_rng(3)
    sets = [[rng.integers(0, 256, 4096, dtype=np.uint8) for _ in range(4)] for _ in range(16)]
    want = [code.encode(data) for data in sets]

    def roundtrip(data):
        parity = code.encode(data)
        return parity, code.decode([None, data[1], None, data[3], *parity])

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(roundtrip, sets))
    for data, expected, (parity, rebuilt) in zip(sets, want, results):
        assert all(np.array_equal(a, b) for a, b in zip(parity, expected))
        assert np.array_equal(rebuilt[0], data[0]) and np.array_equal(rebuilt[2], data[2])


def test_decode_defaults_to_the_lost_data_stripes_and_may_rebuild_parity_only():
    code = ReedSolomonCode(4, 2)
    stripes = stripe_set(code, bytes(range(200)) * 5, 64)
    assert sorted(code.decode([None, *stripes[1:5], None])) == [0]  # lost parity is not rebuilt unasked
    parity_only = code.decode([None, *stripes[1:5], None], {5: bytearray(len(stripes[5]))})
    assert bytes(parity_only[5]) == bytes(stripes[5])
    assert code.decode(stripes) == {}


def test_a_corrupted_data_or_parity_stripe_is_dropped_by_its_checksum_and_rebuilt():
    code = ReedSolomonCode(4, 2)
    data = bytes(range(256)) * 40
    stripes = stripe_set(code, data, 64)
    crcs = [crc32c(s) for s in stripes]
    damaged = [s.copy() for s in stripes]
    damaged[1][7] ^= 1  # a data stripe
    damaged[5][0] ^= 0x80  # a parity stripe
    kept, corrupt = drop_corrupt(damaged, crcs)
    assert corrupt == [1, 5] and kept[1] is None and kept[5] is None
    rebuilt = code.decode(kept)
    assert bytes(join([rebuilt.get(i, kept[i]) for i in range(4)], len(data))) == data
    damaged[2][0] ^= 1  # a third one: more than m, an error and never wrong bytes
    kept, corrupt = drop_corrupt(damaged, crcs)
    assert corrupt == [1, 2, 5]
    with pytest.raises(TooManyLostError, match="3 of the 6 stripes"):
        code.decode(kept)
    assert drop_corrupt([None, stripes[1]], [crcs[0], None]) == ([None, None], [1])  # unknown CRC: lost


@given(data=st.binary(max_size=600), k=st.integers(1, 9), align=st.sampled_from([1, 8, 64]))
def test_split_pads_with_zeros_and_join_takes_it_back(data, k, align):
    stripes = split(data, k, align)
    s = stripe_bytes(len(data), k, align)
    assert len(stripes) == k and all(len(x) == s for x in stripes) and s % align == 0
    assert s * k >= len(data) > s * k - k * align or not data
    flat = b"".join(x.tobytes() for x in stripes)
    assert flat[:len(data)] == data and not any(flat[len(data):])
    assert bytes(join(stripes, len(data))) == data
    out = bytearray(len(data))
    join(stripes, len(data), out)
    assert bytes(out) == data


def test_split_of_a_whole_number_of_stripes_is_views():
    buf = np.arange(256, dtype=np.uint8)
    stripes = split(buf, 4)
    assert all(np.shares_memory(x, buf) for x in stripes) and stripes[1][0] == 64
    assert empty_aligned(100).ctypes.data % 64 == 0 and len(empty_aligned(100)) == 100


def test_to_dict_round_trips_and_unknown_codes_are_rejected():
    for code in (XorCode(3), ReedSolomonCode(8, 2)):
        assert ErasureCode.from_dict(code.to_dict()) == code
    assert XorCode(3).to_dict() == {"name": "xor", "k": 3, "m": 1}
    with pytest.raises(FormatError, match="'rs_vand'"):
        ErasureCode.from_dict({"name": "rs_vand", "k": 4, "m": 2})


@pytest.mark.parametrize("k,m,message", [
    (0, 2, "k=0: must be an integer >= 1"),
    (4, 0, "m=0: must be an integer >= 1"),
    (True, 2, "k=True"),
    (2.0, 2, "k=2.0"),
    (200, 56, "k + m = 200 + 56 = 256: must be at most 255"),
])
def test_invalid_k_or_m_is_an_options_error(k, m, message):
    with pytest.raises(OptionsError, match=message.replace("+", r"\+")):
        erasure_code(k, m)


def test_the_largest_code_works():
    code = erasure_code(MAX_STRIPES - 3, 3)
    stripes = stripe_set(code, bytes(range(256)) * 10, 8)
    rebuilt = code.decode([None, None, *stripes[2:-1], None], {0: bytearray(len(stripes[0])), 1: bytearray(len(stripes[0]))})
    assert bytes(rebuilt[0]) == bytes(stripes[0]) and bytes(rebuilt[1]) == bytes(stripes[1])


def test_xor_code_refuses_more_parity():
    with pytest.raises(OptionsError, match="XOR parity has m = 1 parity stripe, not 2"):
        XorCode(4, 2)


def test_wrong_counts_lengths_and_buffers_are_value_errors():
    code = erasure_code(3, 2)
    data = [bytes(64)] * 3
    with pytest.raises(ValueError, match="encodes 3 data stripes, got 2"):
        code.encode(data[:2])
    with pytest.raises(ValueError, match=r"one length \(64 bytes\); data stripes of other lengths: 2: 65"):
        code.encode([bytes(64), bytes(64), bytes(65)])
    with pytest.raises(ValueError, match="writes 2 parity stripes, got 1"):
        code.encode(data, [bytearray(64)])
    with pytest.raises(ValueError, match="parity stripe 3 is read-only"):
        code.encode(data, [bytes(64), bytearray(64)])
    with pytest.raises(ValueError, match="parity stripes of other lengths: 4: 32"):
        code.encode(data, [bytearray(64), bytearray(32)])
    with pytest.raises(ValueError, match="data stripe 0 is not C-contiguous"):
        code.encode([np.zeros(128, np.uint8)[::2], *data[1:]])
    with pytest.raises(ValueError, match="data stripe 1 is a str, not a buffer"):
        code.encode([bytes(64), "x" * 64, bytes(64)])
    parity = code.encode(data)
    with pytest.raises(ValueError, match=r"decodes from 5 stripes \(None for a lost one\), got 4"):
        code.decode([None, *data[1:], parity[0]])
    with pytest.raises(ValueError, match="out names stripes 1, which are present; it may only name lost ones"):
        code.decode([None, *data[1:], *parity], {1: bytearray(64)})
    with pytest.raises(ValueError, match="out stripes of other lengths: 0: 10"):
        code.decode([None, *data[1:], *parity], {0: bytearray(10)})
    with pytest.raises(ValueError, match="stripes of other lengths: 4: 63"):
        code.decode([None, *data[1:], parity[0], bytes(63)])
