"""prefetch_inputs: the same (batch, inputs) pairs as preparing each batch in turn; ahead of time on CUDA."""

from __future__ import annotations

import pytest
import torch

from fit3d_hf.prefetch import prefetch_inputs


def _prepare(log):
    def prepare(batch):
        log.append(("prepare", batch))
        x = torch.full((4, 5), float(batch), device=DEVICE[0])
        return x * 2, x.sum()

    return prepare


DEVICE = ["cpu"]


def test_cpu_prepares_each_batch_just_before_it_is_used():
    log = []
    seen = []
    for batch, (doubled, total) in prefetch_inputs(range(4), _prepare(log), torch.device("cpu")):
        log.append(("use", batch))
        seen.append((batch, float(doubled[0, 0]), float(total)))
    assert seen == [(b, 2.0 * b, 20.0 * b) for b in range(4)]
    assert log == [(kind, b) for b in range(4) for kind in ("prepare", "use")]


def test_empty_input_yields_nothing():
    assert list(prefetch_inputs([], _prepare([]), torch.device("cpu"))) == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_prepares_one_batch_ahead_with_the_same_values(monkeypatch):
    monkeypatch.setitem(DEVICE, 0, "cuda")
    log = []
    results = []
    for batch, (doubled, total) in prefetch_inputs(range(5), _prepare(log), torch.device("cuda")):
        log.append(("use", batch))
        results.append((batch, (doubled * 1).sum().item(), total.item()))  # consumed on the default stream
    assert results == [(b, 40.0 * b, 20.0 * b) for b in range(5)]
    # batch k + 1 is prepared before batch k is used
    assert log.index(("prepare", 1)) < log.index(("use", 0))
    assert log.index(("prepare", 4)) < log.index(("use", 3))
