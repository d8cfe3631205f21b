"""`GroupedAdam`: torch's Adam whose CUDA step updates every parameter of every group in one kernel launch.

Stage I gives each Gaussian attribute its own learning rate (3DGS's schedule), so its optimizer has eight
groups, and torch's fused Adam, which takes one learning rate per call, steps them in eight calls (13 launches,
about 1.8 TB/s on an H100 for Stage I's 3.4 GB at 1M Gaussians). The extension's `adam_step` takes a step size
per tensor and streams all of them in one launch. The update is torch's Adam term by term (no weight decay, no
amsgrad, not maximising); the state (`step`, `exp_avg`, `exp_avg_sq`) has torch's layout, so checkpoints and
densification's edits of the moments work as with `torch.optim.Adam`. Where the fast path does not apply (CPU
tensors, other dtypes, options it lacks, no extension), `torch.optim.Adam.step` runs instead.

A group may say that only a prefix of each row of its parameters can move (`group["live_prefix"]`: the number
of leading elements of each row, a row being a parameter's elements past its first dimension): the caller
guarantees that the other elements have zero gradients and zero moments, so that Adam leaves them as they are,
and the kernel skips them (Stage I's higher SH orders before their degree is in use, 3DGS's schedule: 45 of a
Gaussian's 123 stepped floats until iteration 1000). torch's step, which steps them all, gives the same result.
"""

from __future__ import annotations

import math

import torch

__all__ = ["GroupedAdam", "make_adam"]


def _adam_extension():
    """The CUDA extension where it has the one-launch Adam kernel, else None."""
    from .render._backend import load_extension

    ext = load_extension()
    return ext if ext is not None and hasattr(ext, "adam_step") else None


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


class GroupedAdam(torch.optim.Adam):
    """`torch.optim.Adam(params, lr, betas, eps)` (no weight decay), stepped by one launch on CUDA."""

    def __init__(
        self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ):
        # foreach=False: the fallback is torch's per-tensor loop; its state (a CPU `step` tensor) is ours too
        super().__init__(params, lr=lr, betas=betas, eps=eps, foreach=False)

    def _extension(self):
        return _adam_extension()

    def _fast_path_applies(self, params: list[torch.Tensor]) -> bool:
        for group in self.param_groups:
            if group["weight_decay"] or group["amsgrad"] or group["maximize"] or group["capturable"]:
                return False
            if group["differentiable"] or isinstance(group["lr"], torch.Tensor):
                return False
        # elementwise, so any dense layout does (the decoder's weight is channels-last) if all four share it
        return all(
            p.is_cuda and p.dtype == torch.float32 and p.device == params[0].device and _dense(p)
            and not p.grad.is_sparse and p.grad.dtype == torch.float32 and p.grad.stride() == p.stride()
            and all(m.stride() == p.stride() for m in self._moments(p))
            for p in params
        )  # fmt: skip

    def _moments(self, p: torch.Tensor) -> list[torch.Tensor]:
        state = self.state.get(p)
        return [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state] if state else []

    @torch.no_grad()
    def step(self, closure=None):
        with_grad = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not with_grad or not self._fast_path_applies(with_grad) or (ext := self._extension()) is None:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, grads, exp_avgs, exp_avg_sqs, hyper, live = [], [], [], [], [], []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            prefix = group.get("live_prefix")
            for p in group["params"]:
                if p.grad is None:
                    continue  # as torch: a parameter without a gradient is left alone, its step count too
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device.type != "cpu":
                    # a fused Adam's checkpoint keeps the count on the GPU: moved once, read without syncs after
                    state["step"] = state["step"].cpu()
                state["step"] += 1
                step = state["step"].item()
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                step_size = group["lr"] / (1 - beta1**step)
                hyper.append((step_size, math.sqrt(1 - beta2**step), beta1, beta2, group["eps"]))
                live.append(-1 if prefix is None or not p.is_contiguous() else int(prefix))
        ext.adam_step(params, grads, exp_avgs, exp_avg_sqs, hyper, live)
        return loss


def make_adam(groups: list[dict], eps: float, device: torch.device) -> torch.optim.Adam:
    """Adam over `groups` for tensors on `device`: `GroupedAdam` where the CUDA extension has its kernel, else
    torch's fused Adam (CUDA and CPU: one pass over each tensor instead of a dozen elementwise ops; a tenth of a
    CPU Stage I iteration went to the unfused update's sqrt and div)."""
    if device.type == "cuda" and _adam_extension() is not None:
        return GroupedAdam(groups, lr=0.0, eps=eps)
    return torch.optim.Adam(groups, lr=0.0, eps=eps, fused=device.type in ("cuda", "cpu"))
