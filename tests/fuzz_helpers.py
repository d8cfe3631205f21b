"""Shared by the property-based tests: bounded hypothesis settings and a count of the inputs each target
was fed (printed at the end of the session by conftest.py)."""

import os
from collections import Counter

from hypothesis import HealthCheck, settings

# Inputs tried per fuzz target, by target name, and how many of them were refused with a named error.
FUZZ_COUNTS: Counter = Counter()
FUZZ_REFUSED: Counter = Counter()

# Bounded, reproducible runs: the same examples every time (derandomize), no example database in the
# repository, and no deadline (file I/O on a busy 2-core CI machine varies). FIT3D_FUZZ_EXAMPLES=2000
# FIT3D_FUZZ_RANDOM=1 runs a deeper search with fresh random examples locally.
FUZZ_SETTINGS = settings(
    max_examples=int(os.environ.get("FIT3D_FUZZ_EXAMPLES", "100")),
    deadline=None,
    derandomize="FIT3D_FUZZ_RANDOM" not in os.environ,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)


def count(target: str, refused: bool) -> None:
    FUZZ_COUNTS[target] += 1
    FUZZ_REFUSED[target] += bool(refused)
