"""One scene's Stage I optimisation (`Lifter`): the feature Gaussians, the per-scene decoder, Adam with 3DGS's
schedules, densification, the view order, the compressed-colour refinement, evaluation and checkpoint state."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..gaussians import Densifier, FeatureGaussians
from ..gaussians.sh_codec import CompressedSH, assemble_sh, encode_sh
from ..losses import masked_mse, psnr_of_mse, ssim, upsampled_feature_l1
from ..optim import make_adam
from .arguments import LiftingArguments
from .scene_data import SceneData, scene_extent

__all__ = ["Lifter", "exponential_lr"]

logger = logging.getLogger(__name__)


def exponential_lr(step: int, lr_init: float, lr_final: float, max_steps: int) -> float:
    """Log-linear interpolation from lr_init to lr_final over max_steps (3DGS's position schedule)."""
    t = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return math.exp(math.log(lr_init) * (1 - t) + math.log(lr_final) * t)


class Lifter:
    """The state of one scene's optimisation: Gaussians, decoder, optimizer, densifier, view order."""

    def __init__(self, args: LiftingArguments, data: SceneData, train_views: list[int], device: torch.device):
        self.args, self.data, self.train_views, self.device = args, data, train_views, device
        self.extent = scene_extent(data.camera_centers)
        generator = torch.Generator().manual_seed(args.seed)
        if len(data.points) > 0:
            gaussians = FeatureGaussians.from_points(
                data.points, data.point_colors, args.feature_dim, max_sh_degree=args.sh_degree
            )
        else:
            center = data.camera_centers.mean(axis=0)
            gaussians = FeatureGaussians.random_in_box(
                args.random_init_points, center - self.extent, center + self.extent, args.feature_dim,
                generator=generator, max_sh_degree=args.sh_degree,
            )  # fmt: skip
        self.gaussians = gaussians.to(device)
        backbone_dim = data.targets.shape[1]
        # FiT3D's decoder: one 3x3 convolution F -> D, no bias, no activation, no upsampling.
        self.decoder = torch.nn.Conv2d(args.feature_dim, backbone_dim, 3, padding=1, bias=False).to(device)
        # channels-last: cuDNN and oneDNN convolve such maps without transposing them, the CPU rasterizer
        # writes its features so, and both rasterizers read the gradient back in that layout
        self.decoder.to(memory_format=torch.channels_last)
        self.optimizer = self._make_optimizer()
        self.densifier = Densifier(args.densification(), self.extent, len(self.gaussians), seed=args.seed)
        self.view_generator = torch.Generator().manual_seed(args.seed + 1)
        self.view_stack: list[int] = []
        self.iteration = 0
        self.densification_totals = {"cloned": 0, "split": 0, "pruned": 0, "opacity_reset": 0}

    def _make_optimizer(self) -> torch.optim.Adam:
        args, g = self.args, self.gaussians
        groups = [
            {"params": [g.means], "lr": args.position_lr_init * self.extent, "name": "means"},
            {"params": [g.sh_dc], "lr": args.sh_dc_lr, "name": "sh_dc"},
            {"params": [g.sh_rest], "lr": args.sh_rest_lr, "name": "sh_rest"},
            {"params": [g.features], "lr": args.feature_lr, "name": "features"},
            {"params": [g.opacity_logits], "lr": args.opacity_lr, "name": "opacity_logits"},
            {"params": [g.log_scales], "lr": args.scaling_lr, "name": "log_scales"},
            {"params": [g.quats], "lr": args.rotation_lr, "name": "quats"},
            {"params": list(self.decoder.parameters()), "lr": args.decoder_lr, "name": "decoder"},
        ]
        # one launch for all eight groups on CUDA, torch's fused Adam elsewhere (fit3d_hf/optim.py)
        return make_adam(groups, eps=1e-15, device=self.device)

    def _mark_live_sh_orders(self) -> None:
        """Tells the optimizer which higher-order SH coefficients can move: those of the degrees in use. The others
        get zero gradients (the SH backward writes zeros past the degree) and keep zero moments until their degree
        comes, so Adam leaves them unchanged and GroupedAdam's kernel skips them (fit3d_hf/optim.py)."""
        g = self.gaussians
        live = 3 * ((g.active_sh_degree + 1) ** 2 - 1)
        for group in self.optimizer.param_groups:
            if group["name"] == "sh_rest":
                group["live_prefix"] = live if live < g.sh_rest.shape[1] * g.sh_rest.shape[2] else None

    def next_view(self) -> int:
        # 3DGS's order: a shuffled stack of the training views, refilled when empty.
        if not self.view_stack:
            order = torch.randperm(len(self.train_views), generator=self.view_generator).tolist()
            self.view_stack = [self.train_views[i] for i in order]
        return self.view_stack.pop()

    def render(self, view: int, with_grad: bool, feature_dtype: torch.dtype | None = None):
        from ..render import render

        g = self.gaussians
        with torch.set_grad_enabled(with_grad):
            # the SH parameters as they are (the degree limits the terms used): no concatenation per iteration
            return render(
                g.means, g.quats, g.scales, g.opacities, (g.sh_dc, g.sh_rest), g.features,
                self.data.K[view : view + 1], self.data.world_to_camera[view : view + 1],
                self.data.width, self.data.height, sh_degree=g.active_sh_degree, near_plane=self.args.near_plane,
                feature_dtype=feature_dtype,
            )  # fmt: skip

    def render_and_decode(self, view: int, with_grad: bool):
        """A view's render and its decoded features, in the training's precision. With `--mixed_precision bf16`
        the rasterizer writes the features as the decoder reads them (bfloat16, channels-last) and reads their
        gradient back so: no converting copies of the map (0.26 ms per iteration at 1M Gaussians, H100).
        Float32 features are made channels-last for the convolution, whose gradient the rasterizer reads in that
        layout."""
        bf16 = self.args.mixed_precision == "bf16"
        out = self.render(view, with_grad, feature_dtype=torch.bfloat16 if bf16 else None)
        features = out.features if bf16 else out.features.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            return out, self.decoder(features)

    def step(self) -> dict[str, torch.Tensor]:
        args, data = self.args, self.data
        self.iteration += 1
        it = self.iteration
        for group in self.optimizer.param_groups:
            if group["name"] == "means":
                decay_steps = args.position_lr_max_steps or args.iterations
                group["lr"] = self.extent * exponential_lr(
                    it, args.position_lr_init, args.position_lr_final, decay_steps
                )
        if it % args.sh_increase_interval == 0:
            self.gaussians.raise_sh_degree()

        view = self.next_view()
        out, decoded = self.render_and_decode(view, with_grad=True)
        mask = data.masks[view : view + 1]
        loss_rgb, l1_rgb = self.rgb_loss(out.rgb, view)
        l1_features = upsampled_feature_l1(decoded, data.targets[view : view + 1], mask)
        loss = args.rgb_loss_weight * loss_rgb + args.feature_loss_weight * l1_features
        loss.backward()

        # 3DGS's order: densify first, then step. Parameters that densification (or an opacity reset) just
        # replaced have no gradient, so Adam skips them this once; the decoder always steps. The last
        # iteration takes no step (3DGS steps only while iteration < iterations).
        with torch.no_grad():
            if it < args.densify_until:
                self.densifier.update_stats(out.means2d.grad[0], out.radii[0], data.width, data.height)
            for key, value in self.densifier.step(it, self.gaussians, self.optimizer).items():
                if key in self.densification_totals:
                    self.densification_totals[key] += value
            if it < args.iterations:
                self._mark_live_sh_orders()  # from the degree this step rendered with, however it was set
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        # Detached tensors, not floats: reading a value would wait for the GPU at every step.
        return {"loss": loss.detach(), "l1_rgb": l1_rgb.detach(), "l1_features": l1_features.detach()}

    def rgb_loss(self, rgb: torch.Tensor, view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """3DGS's `(1 - lambda) * L1 + lambda * (1 - SSIM)` of a rendered view, and its L1 part."""
        # Anonymised pixels: the targets become the (detached) prediction, so they add no loss.
        target = torch.where(self.data.masks[view : view + 1], self.data.image(view), rgb.detach())
        l1 = (rgb - target).abs().mean()
        return (1 - self.args.lambda_dssim) * l1 + self.args.lambda_dssim * (1.0 - ssim(rgb, target)), l1

    def compress_colours(self) -> CompressedSH:
        """The SH colours compressed for the bundle: 8-bit DC terms and a k-means codebook of the higher orders
        (`fit3d_hf.gaussians.sh_codec.encode_sh`)."""
        logger.info(
            "%s: compressing the SH colours of %d Gaussians (k-means)",
            self.data.scene_id,
            len(self.gaussians),
        )
        return encode_sh(self.gaussians.sh, seed=self.args.seed)

    def refine_compressed_colours(
        self, compressed: CompressedSH, steps: int, progress: bool = False
    ) -> CompressedSH:
        """`compressed` with its DC terms and codebook refined by rendering the training views for `steps`
        iterations (RGB loss; geometry, features and each Gaussian's code fixed), as compact 3DGS methods do
        after vector quantisation: the k-means codebook alone keeps only the dominant higher-order patterns, and
        the DC terms can take up the average of what it misses over the directions each Gaussian is seen from.
        """
        from ..render import render

        args, data, g = self.args, self.data, self.gaussians
        codes = compressed.rest_codes.to(torch.int32).long().to(self.device)
        codebook = torch.nn.Parameter(compressed.rest_codebook.float().to(self.device))
        dc = torch.nn.Parameter(g.sh_dc.detach().clone())
        if steps > 0 and codebook.shape[1] > 0:
            # the training's Adam: one kernel launch per step on CUDA (torch's foreach Adam launches several)
            groups = [{"params": [dc], "lr": args.sh_dc_lr}, {"params": [codebook], "lr": args.sh_rest_lr}]
            optimizer = make_adam(groups, eps=1e-15, device=self.device)
            geometry = [t.detach() for t in (g.means, g.quats, g.scales, g.opacities)]
            for _ in tqdm(
                range(steps), desc=f"{data.scene_id}: refining the compressed colours", disable=not progress
            ):
                view = self.next_view()
                # embedding, not codebook[codes]: indexing's backward accumulates each run of equal codes in
                # one warp, one Gaussian after another, and code 0 (never-trained higher orders, e.g. Gaussians
                # no view sees) can hold much of a scene; embedding's backward splits long runs. padding_idx
                # keeps row 0 the zero vector.
                rest = F.embedding(codes, codebook, padding_idx=0).view(len(codes), -1, 3)
                colours = (dc, rest)  # the SH pair, read in place
                out = render(
                    *geometry, colours, None, data.K[view : view + 1], data.world_to_camera[view : view + 1],
                    data.width, data.height, sh_degree=g.active_sh_degree, render_depth=False, near_plane=args.near_plane,
                )  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                self.rgb_loss(out.rgb, view)[0].backward()
                optimizer.step()
        return assemble_sh(dc.detach()[:, 0], codebook.detach(), codes)

    @torch.no_grad()
    def evaluate(self, views: list[int], desc: str | None = None) -> dict[str, float]:
        """Mean PSNR (valid pixels) and feature L1 over `views` (with a progress bar labelled `desc`, if given), the
        features decoded in the training's precision."""
        if not views:
            return {}
        # per-view values stay on the device until the end: reading each would wait for the GPU every view
        mses, l1s = [], []
        for view in tqdm(views, desc=desc, disable=desc is None, leave=False):
            out, decoded = self.render_and_decode(view, with_grad=False)
            mask = self.data.masks[view : view + 1]
            mses.append(masked_mse(out.rgb.clamp(0, 1), self.data.image(view), mask))
            # the training loss's fused kernel; it divides by all pixels, the metric by the valid ones
            l1 = upsampled_feature_l1(decoded, self.data.targets[view : view + 1], mask)
            l1s.append(l1 * mask.numel() / mask.sum().clamp_min(1))
        psnrs = [psnr_of_mse(mse) for mse in torch.stack(mses).tolist()]
        return {"psnr": float(np.mean(psnrs)), "feature_l1": float(torch.stack(l1s).mean())}

    # --- checkpoints (torch.save of tensors and plain values only; loaded with weights_only=True) ---
    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "active_sh_degree": self.gaussians.active_sh_degree,
            # tensors on the device, read in place: the checkpoint writer copies them (see CheckpointWriter)
            "gaussians": {k: v.detach() for k, v in self.gaussians.state_dict().items()},
            "decoder": {k: v.detach() for k, v in self.decoder.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "densifier": self.densifier.state_dict(),
            "view_generator": self.view_generator.get_state(),
            "view_stack": list(self.view_stack),
            "densification_totals": dict(self.densification_totals),
        }

    def load_state_dict(self, state: dict) -> None:
        tensors = state["gaussians"]
        self.gaussians = FeatureGaussians(
            tensors["means"], tensors["quats"], tensors["log_scales"], tensors["opacity_logits"],
            torch.cat([tensors["sh_dc"], tensors["sh_rest"]], dim=1), tensors["features"],
            max_sh_degree=self.args.sh_degree,
        ).to(self.device)  # fmt: skip
        self.gaussians.active_sh_degree = state["active_sh_degree"]
        self.decoder.load_state_dict(state["decoder"])
        self.optimizer = self._make_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.densifier.load_state_dict(state["densifier"])
        self.view_generator.set_state(state["view_generator"])
        self.view_stack = list(state["view_stack"])
        self.iteration = int(state["iteration"])
        self.densification_totals = dict(state["densification_totals"])
