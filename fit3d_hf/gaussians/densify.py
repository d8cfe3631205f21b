"""Adaptive density control of 3DGS (clone, split, prune, opacity reset), as FiT3D runs it unchanged.

The schedule and thresholds are those of 3DGS (and of FiT3D's `train_feat_gaussian.py`): densify from
iteration 500 to 15,000 every 100 iterations when the mean screen-space gradient of a Gaussian's centre
exceeds 2e-4 (in normalised device coordinates); clone small Gaussians, split large ones in two; prune
those with opacity < 0.005 and, after the first opacity reset, those larger than 0.1 x the scene extent in
the world; reset opacities to at most 0.01 every 3,000 iterations.

3DGS's code also tests a 20 px screen radius, but that test never fires there: `densification_postfix`,
which clone and split run just before the prune, resets `max_radii2D` to zeros (graphdeco-inria/
gaussian-splatting issues #123, #544, #643). So no Gaussian is pruned by screen size by default;
`prune_screen_size=True` applies the test to the radii seen since the last densification, which prunes
more than 3DGS does.

Changing the number of Gaussians means replacing parameters, so the Adam moments are edited alongside
(new Gaussians start with zero moments), which is why this module needs the optimizer. A replaced
parameter has no gradient, so an optimizer step taken right after a change skips it, as in 3DGS, whose
training loop densifies before its optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

# One rotation convention everywhere (wxyz, normalised first): the renderer's, from the shared geometry maths.
from ..geometry import quat_to_rotmat
from .model import FeatureGaussians

__all__ = ["DensificationConfig", "Densifier"]


@dataclass
class DensificationConfig:
    """Schedule and thresholds of adaptive density control (defaults: 3DGS / FiT3D)."""

    densify_from: int = 500
    densify_until: int = 15_000
    densify_interval: int = 100
    opacity_reset_interval: int = 3_000
    grad_threshold: float = 2e-4
    percent_dense: float = 0.01
    min_opacity: float = 0.005
    max_screen_size: float = 20.0
    prune_screen_size: bool = False  # 3DGS's screen-size test is dead code there (see the module docstring)
    max_world_scale: float = 0.1
    max_gaussians: int | None = None


def _edit_parameters(
    model: FeatureGaussians,
    optimizer: torch.optim.Optimizer,
    edit_value: Callable[[str, torch.Tensor], torch.Tensor],
    edit_moment: Callable[[torch.Tensor], torch.Tensor],
    names: tuple[str, ...] = FeatureGaussians.PARAMETER_NAMES,
) -> None:
    """Replaces the per-Gaussian parameters `names` by `edit_value(name, old)` and their Adam moments by
    `edit_moment(old_moment)`, keeping the optimizer pointing at the new parameters (which have no
    gradient: an optimizer step before the next backward leaves them alone)."""
    for name in names:
        old = getattr(model, name)
        new = nn.Parameter(edit_value(name, old.data).contiguous())
        for group in optimizer.param_groups:
            for index, param in enumerate(group["params"]):
                if param is old:
                    group["params"][index] = new
                    state = optimizer.state.pop(old, None)
                    if state:
                        for key in ("exp_avg", "exp_avg_sq"):
                            if key in state:
                                state[key] = edit_moment(state[key]).contiguous()
                        optimizer.state[new] = state
        setattr(model, name, new)


class Densifier:
    """Accumulates screen-space gradient statistics and applies the densification schedule.

    Args:
        config: schedule and thresholds.
        scene_extent: 1.1 x the largest distance of a camera centre from their mean (3DGS's
            `cameras_extent`); world-space thresholds are fractions of it.
        num_gaussians: current number of Gaussians.
        seed: seeds the generator that samples the positions of split Gaussians.
    """

    def __init__(self, config: DensificationConfig, scene_extent: float, num_gaussians: int, seed: int = 0):
        self.config = config
        self.scene_extent = float(scene_extent)
        self.generator = torch.Generator().manual_seed(seed)
        self._reset_stats(num_gaussians)

    def _reset_stats(self, n: int, device: torch.device | str = "cpu") -> None:
        self.grad_accum = torch.zeros(n, device=device)
        self.denom = torch.zeros(n, device=device)
        self.max_radii = torch.zeros(n, device=device)

    def update_stats(self, means2d_grad: torch.Tensor, radii: torch.Tensor, width: int, height: int) -> None:
        """Adds one view's statistics.

        Args:
            means2d_grad: `[N, 2]` gradient of the loss w.r.t. the projected centres, in pixels.
            radii: `[N]` screen radii in pixels (0 = not visible in this view).
        """
        device = means2d_grad.device
        if self.grad_accum.device != device:  # keep the statistics where the gradients are: no syncs
            self.grad_accum, self.denom, self.max_radii = (
                t.to(device) for t in (self.grad_accum, self.denom, self.max_radii)
            )
        visible = radii > 0  # (bool: multiplied and added as 0 / 1)
        # Pixel -> NDC gradient (x_pixel = (x_ndc + 1) * W / 2), the unit of 3DGS's 2e-4 threshold. Scaled by
        # Python numbers: a tensor of the two factors made here would be a blocking host-to-device copy, i.e. a
        # wait for the GPU at every iteration.
        grad = means2d_grad.detach().float()
        self.grad_accum += torch.hypot(grad[:, 0] * (width / 2.0), grad[:, 1] * (height / 2.0)) * visible
        self.denom += visible
        self.max_radii = torch.where(
            visible, torch.maximum(self.max_radii, radii.detach().float()), self.max_radii
        )

    def step(
        self, iteration: int, model: FeatureGaussians, optimizer: torch.optim.Optimizer
    ) -> dict[str, int]:
        """Runs the schedule after optimisation step `iteration` (1-based). Returns what changed."""
        config, changes = self.config, {}
        if iteration >= config.densify_until:
            return changes
        if iteration > config.densify_from and iteration % config.densify_interval == 0:
            with torch.no_grad():
                changes = self.densify_and_prune(
                    model, optimizer, prune_large=iteration > config.opacity_reset_interval
                )
        if iteration % config.opacity_reset_interval == 0:
            with torch.no_grad():
                self.reset_opacity(model, optimizer)
            changes["opacity_reset"] = 1
        return changes

    def densify_and_prune(
        self, model: FeatureGaussians, optimizer: torch.optim.Optimizer, prune_large: bool
    ) -> dict[str, int]:
        config = self.config
        grads = (self.grad_accum / self.denom.clamp_min(1)).to(model.means.device)
        max_scale = model.scales.max(dim=1).values
        candidates = grads >= config.grad_threshold
        is_small = max_scale <= config.percent_dense * self.scene_extent
        clone_mask = candidates & is_small
        split_mask = candidates & ~is_small
        if config.max_gaussians is not None:
            clone_mask, split_mask = self._apply_cap(len(model), grads, clone_mask, split_mask)
        # Rows are gathered by index tensors made once: a boolean mask as an index costs a wait for the GPU
        # (its count) per tensor, some forty per densification.
        clone_rows, split_rows = clone_mask.nonzero().squeeze(1), split_mask.nonzero().squeeze(1)
        n_clone, n_split = len(clone_rows), len(split_rows)

        # Clone: exact copies (the optimiser then moves them apart).
        clones = {name: getattr(model, name).data[clone_rows] for name in FeatureGaussians.PARAMETER_NAMES}
        # Split: two samples from each large Gaussian, scaled down by 1 / (0.8 * 2).
        scales = model.scales.data[split_rows].repeat(2, 1)
        offsets = torch.normal(torch.zeros_like(scales).cpu(), scales.cpu(), generator=self.generator).to(
            scales
        )
        rotations = quat_to_rotmat(model.quats.data[split_rows]).repeat(2, 1, 1)
        splits = {
            name: getattr(model, name).data[split_rows].repeat(2, *([1] * (getattr(model, name).dim() - 1)))
            for name in FeatureGaussians.PARAMETER_NAMES
        }
        splits["means"] = splits["means"] + torch.bmm(rotations, offsets[..., None])[..., 0]
        splits["log_scales"] = torch.log(scales / (0.8 * 2))
        new = {name: torch.cat([clones[name], splits[name]]) for name in FeatureGaussians.PARAMETER_NAMES}

        # Remove the split originals, then prune transparent (and, later, too large) Gaussians, old and new.
        current = {name: getattr(model, name).data for name in ("opacity_logits", "log_scales")}
        prune_old, prune_new = self._prune_mask(current, prune_large), self._prune_mask(new, prune_large)
        if prune_large and config.prune_screen_size:
            # Gaussians added just now have no screen statistics yet (radius 0).
            prune_old |= self.max_radii.to(prune_old.device) > config.max_screen_size
        keep_old = (~(split_mask | prune_old)).nonzero().squeeze(1)
        keep_new = (~prune_new).nonzero().squeeze(1)
        n_pruned = int(prune_old.sum() + prune_new.sum())
        self._rebuild(model, optimizer, keep_old, new, keep_new)
        self._reset_stats(len(model), model.means.device)
        return {"cloned": n_clone, "split": n_split, "pruned": n_pruned, "total": len(model)}

    def _prune_mask(self, values: dict[str, torch.Tensor], prune_large: bool) -> torch.Tensor:
        """Which of the Gaussians with these parameter `values` are transparent or, with `prune_large`, too
        large in the world (the activations of `FeatureGaussians.opacities` and `.scales`)."""
        prune = torch.sigmoid(values["opacity_logits"]) < self.config.min_opacity
        if prune_large:
            prune |= (
                torch.exp(values["log_scales"]).max(dim=1).values
                > self.config.max_world_scale * self.scene_extent
            )
        return prune

    def _apply_cap(self, n, grads, clone_mask, split_mask):
        """Keeps only the highest-gradient candidates so that the count stays within `max_gaussians`."""
        room = self.config.max_gaussians - n
        candidates = clone_mask | split_mask
        # A clone adds one Gaussian, a split adds one net (two new, one removed).
        if int(candidates.sum()) <= max(room, 0):
            return clone_mask, split_mask
        allowed = torch.zeros_like(candidates)
        if room > 0:
            order = torch.argsort(
                torch.where(candidates, grads, torch.full_like(grads, -1.0)), descending=True
            )
            allowed[order[:room]] = True
        return clone_mask & allowed, split_mask & allowed

    def reset_opacity(self, model: FeatureGaussians, optimizer: torch.optim.Optimizer) -> None:
        """Opacities to at most 0.01, their Adam moments to zero; only the opacity parameter is replaced
        (3DGS's `replace_tensor_to_optimizer`), so only it skips the next optimizer step."""
        target = torch.logit(torch.clamp_max(model.opacities.data, 0.01).float()).to(model.opacity_logits)
        _edit_parameters(
            model, optimizer, lambda name, value: target, torch.zeros_like, names=("opacity_logits",)
        )

    def _rebuild(
        self, model, optimizer, keep_old: torch.Tensor, new: dict[str, torch.Tensor], keep_new: torch.Tensor
    ) -> None:
        """Every parameter becomes its rows `keep_old` followed by rows `keep_new` of `new[name]`, and its Adam
        moments the same rows, zero for the new ones: one gather per tensor."""
        n_old = len(keep_old)

        def gather(old: torch.Tensor, new_rows: torch.Tensor | None) -> torch.Tensor:
            out = old.new_empty((n_old + len(keep_new), *old.shape[1:]))
            torch.index_select(old, 0, keep_old, out=out[:n_old])
            if new_rows is None:
                out[n_old:] = 0
            else:
                out[n_old:] = new_rows[keep_new].to(old)
            return out

        _edit_parameters(
            model,
            optimizer,
            lambda name, value: gather(value, new[name]),
            lambda moment: gather(moment, None),
        )

    def state_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "scene_extent": self.scene_extent,
            "grad_accum": self.grad_accum.cpu().clone(),
            "denom": self.denom.cpu().clone(),
            "max_radii": self.max_radii.cpu().clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.scene_extent = float(state["scene_extent"])
        self.grad_accum = state["grad_accum"].clone()
        self.denom = state["denom"].clone()
        self.max_radii = state["max_radii"].clone()
        self.generator.set_state(state["generator"])
