"""uid parsing of per-uid tables: either case, invalid uids marked, slices of arrow arrays."""

import numpy as np
import pyarrow as pa

from sieve_tasks.tables import uid_halves


def test_uid_halves_of_either_case_and_invalid_uids():
    uids = ["0123456789abcdefFEDCBA9876543210", None, "zz", "0123456789abcdef0123456789abcdeg",
            "ffffffffffffffffffffffffffffffff", "0" * 31 + "é", "00000000000000000000000000000001"]
    hi, lo, valid = uid_halves(pa.array(uids))
    assert valid.tolist() == [True, False, False, False, True, False, True]
    for u, h, l, ok in zip(uids, hi, lo, valid):
        if ok:
            assert (int(h), int(l)) == (int(u[:16], 16), int(u[16:], 16))
    sliced_hi, sliced_lo, sliced_valid = uid_halves(pa.array(uids).slice(3, 4))
    assert sliced_valid.tolist() == [False, True, False, True]
    assert int(sliced_hi[1]) == 2**64 - 1 and int(sliced_lo[3]) == 1


def test_uid_halves_match_python_on_random_uids():
    rng = np.random.default_rng(5)
    values = [int(x) for x in rng.integers(0, 2**63, 1000, dtype=np.uint64)]
    uids = [f"{v:016x}{v * 3 % 2**64:016X}" for v in values]
    hi, lo, valid = uid_halves(pa.array(uids))
    assert valid.all()
    assert [(int(h), int(l)) for h, l in zip(hi, lo)] == [(int(u[:16], 16), int(u[16:], 16)) for u in uids]
