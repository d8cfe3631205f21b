"""`map_ahead` (fit3d_hf/utils.py): Stage I reads a scene's views on threads ahead of the backbone; the results
come in order, at most `ahead` items are read before they are taken, and a reader's error reaches the caller."""

import threading
import time

import pytest

from fit3d_hf.utils import map_ahead


def test_results_come_in_order_whatever_finishes_first():
    def slow_for_early_items(i):
        time.sleep(0.002 * (10 - i))  # the first items finish last
        return i * i

    assert list(map_ahead(slow_for_early_items, range(10), workers=4)) == [i * i for i in range(10)]
    assert list(map_ahead(slow_for_early_items, range(10), workers=1)) == [i * i for i in range(10)]


def test_reads_at_most_ahead_items_before_they_are_taken():
    started = []
    lock = threading.Lock()

    def read(i):
        with lock:
            started.append(i)
        return i

    results = map_ahead(read, range(100), workers=2, ahead=3)
    taken = []
    for value in results:
        taken.append(value)
        time.sleep(0.001)  # a slow consumer: the readers would race ahead if they were not held back
        with lock:
            # the item just taken, plus at most `ahead` submitted after it (submitted = may have started)
            assert len(started) <= len(taken) + 3 + 1
    assert taken == list(range(100)) and sorted(started) == list(range(100))


def test_a_readers_error_is_raised_at_its_item():
    def read(i):
        if i == 5:
            raise ValueError(f"item {i} is unreadable")
        return i

    results = map_ahead(read, range(20), workers=3)
    assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="item 5 is unreadable"):
        next(results)
