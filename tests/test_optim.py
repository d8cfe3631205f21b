"""`GroupedAdam` (fit3d_hf/optim.py) takes the same steps as `torch.optim.Adam`: on CUDA by the extension's
one-launch kernel (rasterizer_cuda/adam.cu), elsewhere by torch's own step; its state has torch's layout, so
densification's edits and checkpoints carry over between the two."""

from __future__ import annotations

import pytest
import torch
from render_helpers import cuda_test

from fit3d_hf.optim import GroupedAdam, make_adam

# Stage I's shapes in small: per-Gaussian attributes of odd widths and a count that is no multiple of the
# kernel's vectors or blocks (partial blocks), plus a channels-last convolution weight (the decoder).
_SHAPES = [(2051, 3), (2051, 45), (2051, 64), (2051,), (5, 5), (7, 3, 3, 3)]


def _parameters(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in _SHAPES]
    params[-1] = params[-1].contiguous(memory_format=torch.channels_last)
    return [torch.nn.Parameter(p.to(device)) for p in params]


def _groups(params):
    # a learning rate per group, as Stage I's; two tensors share the last group
    return [{"params": [p], "lr": 1e-3 * (i + 1)} for i, p in enumerate(params[:-2])] + [
        {"params": params[-2:], "lr": 3e-2}
    ]


def _run(optimizer, params, steps, seed=1, skip=None):
    """`steps` steps with fixed random gradients; at step `skip[0]` parameter `skip[1]` has no gradient."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g).to(p.device)
            p.grad = None if skip == (step, i) else grad.contiguous(memory_format=torch.preserve_format)
            if p.grad is not None and p.dim() == 4:
                p.grad = p.grad.contiguous(memory_format=torch.channels_last)
        optimizer.step()
    return [p.detach().clone() for p in params]


def test_cpu_falls_back_to_torch_adam_exactly():
    ours, theirs = _parameters("cpu"), _parameters("cpu")
    a = _run(GroupedAdam(_groups(ours), eps=1e-15), ours, 5, skip=(2, 1))
    b = _run(torch.optim.Adam(_groups(theirs), eps=1e-15, foreach=False), theirs, 5, skip=(2, 1))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    # the moved parameters really moved
    assert not torch.equal(a[0], _parameters("cpu")[0])


def test_make_adam_on_cpu_is_torch_fused():
    params = _parameters("cpu")
    optimizer = make_adam(_groups(params), eps=1e-15, device=torch.device("cpu"))
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["fused"]


@cuda_test
def test_one_launch_step_matches_torch_adam():
    ours, theirs = _parameters("cuda"), _parameters("cuda")
    optimizer = make_adam(_groups(ours), eps=1e-15, device=torch.device("cuda"))
    assert isinstance(optimizer, GroupedAdam)
    calls = []
    original = optimizer._extension

    def counting_extension():
        ext = original()
        calls.append(ext is not None)
        return ext

    optimizer._extension = counting_extension
    a = _run(optimizer, ours, 6, skip=(3, 2))
    # torch's per-tensor Adam: its bias corrections, like ours, are taken in double precision (the fused one
    # takes 1 - beta2**step in float32, 1.3e-5 off at step 1, and differs from both by ~1e-5 relative)
    torch_adam = torch.optim.Adam(_groups(theirs), eps=1e-15, foreach=False)
    b = _run(torch_adam, theirs, 6, skip=(3, 2))
    assert calls == [True] * 6  # every step took the kernel
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-7)
    # the step counts follow torch's: the parameter without a gradient at step 3 has taken one step fewer
    assert [optimizer.state[p]["step"].item() for p in ours] == [6, 6, 5, 6, 6, 6]
    # torch's Adam moves exp_avg by lerp (m + 0.1 (g - m)) where the kernel takes 0.9 m + 0.1 g: a few ulp apart at
    # the gradients' unit scale (5e-8 on the H100), which is all an atol can allow near m's zero crossings
    atol = {"exp_avg": 2e-7, "exp_avg_sq": 1e-9}
    for p, q in zip(ours, theirs, strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                optimizer.state[p][key], torch_adam.state[q][key], rtol=2e-6, atol=atol[key]
            )
    assert ours[-1].is_contiguous(memory_format=torch.channels_last)  # the layout survived


@cuda_test
def test_state_round_trips_through_torch_adam():
    """A checkpoint of the grouped step resumes in torch's fused Adam and back, with the result of torch's Adam
    through the same hand-overs (Stage I's checkpoints, and a resume on a machine without the extension)."""
    params = _parameters("cuda")
    reference = _parameters("cuda")
    grouped = GroupedAdam(_groups(params), eps=1e-15)
    _run(grouped, params, 3)
    fused = torch.optim.Adam(_groups(params), eps=1e-15, fused=True)
    fused.load_state_dict(grouped.state_dict())
    _run(fused, params, 2, seed=2)
    back = GroupedAdam(_groups(params), eps=1e-15)
    back.load_state_dict(fused.state_dict())
    result = _run(back, params, 2, seed=3)

    # the same hand-overs with torch's per-tensor Adam in place of ours
    first = torch.optim.Adam(_groups(reference), eps=1e-15, foreach=False)
    _run(first, reference, 3)
    middle = torch.optim.Adam(_groups(reference), eps=1e-15, fused=True)
    middle.load_state_dict(first.state_dict())
    _run(middle, reference, 2, seed=2)
    last = torch.optim.Adam(_groups(reference), eps=1e-15, foreach=False)
    last.load_state_dict(middle.state_dict())
    expected = _run(last, reference, 2, seed=3)
    for x, y in zip(result, expected, strict=True):
        torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-7)
    assert all(back.state[p]["step"].item() == 7 for p in params)


@cuda_test
def test_bad_state_is_refused_by_name():
    from fit3d_hf.render._backend import load_extension

    p = torch.zeros(4, 3, device="cuda")
    with pytest.raises(ValueError, match="exp_avg of parameter 0"):
        load_extension().adam_step([p], [p.clone()], [torch.zeros(3, 4, device="cuda")], [p.clone()],
                                   [(1e-3, 1.0, 0.9, 0.999, 1e-8)], [])  # fmt: skip


@cuda_test
def test_a_live_prefix_steps_only_the_leading_elements_of_each_row():
    """`live_prefix` (Stage I's SH orders in use): with zero gradients and moments past the prefix, the kernel's
    step equals torch's Adam stepping everything, as the prefix grows 0 -> 9 -> 24 -> all; and it really skips
    them: gradients put there on purpose leave those elements and their moments untouched."""
    g = torch.Generator().manual_seed(3)
    shape = (2051, 15, 3)
    ours = torch.nn.Parameter(torch.zeros(shape, device="cuda"))
    theirs = torch.nn.Parameter(torch.zeros(shape, device="cuda"))
    group = {"params": [ours], "lr": 2.5e-3}
    grouped = GroupedAdam([group], eps=1e-15)
    reference = torch.optim.Adam([{"params": [theirs], "lr": 2.5e-3}], eps=1e-15, foreach=False)
    for live in (0, 0, 9, 9, 24, 24, None, None):
        group["live_prefix"] = live
        grad = torch.randn(shape, generator=g).view(shape[0], -1)
        grad[:, 45 if live is None else live :] = 0  # nothing past the prefix: its orders are not in use
        ours.grad, theirs.grad = grad.view(shape).cuda(), grad.view(shape).cuda()
        grouped.step()
        reference.step()
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-7)
    assert ours.view(shape[0], -1)[:, :24].abs().min() > 0  # the early orders moved
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(
            grouped.state[ours][key], reference.state[theirs][key], rtol=2e-6, atol=2e-7
        )

    group["live_prefix"] = 9
    before = {
        "param": ours.detach().clone(),
        **{k: grouped.state[ours][k].clone() for k in ("exp_avg", "exp_avg_sq")},
    }
    ours.grad = torch.ones(shape, device="cuda")
    grouped.step()
    after = {"param": ours.detach(), **{k: grouped.state[ours][k] for k in ("exp_avg", "exp_avg_sq")}}
    for key in before:
        rows_before, rows_after = before[key].view(shape[0], -1), after[key].view(shape[0], -1)
        assert torch.equal(rows_after[:, 9:], rows_before[:, 9:]), key  # skipped, gradient or not
        assert not torch.equal(rows_after[:, :9], rows_before[:, :9]), key


@cuda_test
def test_a_live_prefix_longer_than_the_rows_is_refused():
    from fit3d_hf.render._backend import load_extension

    p = torch.zeros(4, 3, device="cuda")
    with pytest.raises(ValueError, match="live prefix of 4 elements per row"):
        load_extension().adam_step(
            [p], [p.clone()], [p.clone()], [p.clone()], [(1e-3, 1.0, 0.9, 0.999, 1e-8)], [4]
        )
