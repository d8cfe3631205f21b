"""Gaussian bundles: one scene's Stage I output, the input of Stage II, as one safetensors file.

A bundle holds the Gaussians' geometry, their low-dimensional features in fp16, the per-scene decoder
(a 3x3 convolution from the feature dimension F to the backbone dimension D) and the SH colours, plus
metadata naming the backbone so that Stage II can refuse a bundle made for another one.

Stage II needs only geometry, features and decoder: `load_bundle(..., include_sh=False)` reads just
those tensors through safetensors' memory map, so the SH colours (over a third of the file) are never
touched. Storage per Gaussian: means fp32 (12 B), quats/log-scales/opacities fp16 (16 B), features fp16
(2F B), SH fp16 (96 B at degree 3): 252 B at F = 64, 156 B of it needed by Stage II, against the 492 B
of FiT3D's fp32 pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..utils import atomic_path
from .model import FeatureGaussians

__all__ = ["BUNDLE_FILENAME", "BundleMismatchError", "GaussianBundle", "load_bundle", "read_bundle_metadata", "save_bundle"]

BUNDLE_FILENAME = "gaussians.safetensors"
FORMAT_VERSION = "1"
STAGE2_KEYS = ("means", "quats", "log_scales", "opacities", "features", "decoder.weight")
SH_KEY = "sh"


class BundleMismatchError(ValueError):
    """A bundle was made for another backbone or feature dimension than the one asked for."""


@dataclass
class GaussianBundle:
    """The tensors of one scene's bundle (activated opacities, log scales, normalised quaternions).

    Shapes: means `[N, 3]`, quats `[N, 4]`, log_scales `[N, 3]`, opacities `[N]`, features `[N, F]`,
    decoder_weight `[D, F, k, k]`, sh `[N, K, 3]` or None when loaded without colours.
    """

    means: torch.Tensor
    quats: torch.Tensor
    log_scales: torch.Tensor
    opacities: torch.Tensor
    features: torch.Tensor
    decoder_weight: torch.Tensor
    metadata: dict = field(default_factory=dict)
    sh: torch.Tensor | None = None

    @property
    def scales(self) -> torch.Tensor:
        return torch.exp(self.log_scales.float())

    @property
    def scene_id(self) -> str:
        return self.metadata.get("scene_id", "")

    @property
    def backbone(self) -> str:
        return self.metadata.get("backbone", "")

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def backbone_dim(self) -> int:
        return int(self.decoder_weight.shape[0])

    def __len__(self) -> int:
        return int(self.means.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> GaussianBundle:
        """Moves every tensor to `device`, as `dtype` (features too: the renderer blends in fp32)."""

        def move(tensor):
            return None if tensor is None else tensor.to(device=device, dtype=dtype, non_blocking=True)

        return GaussianBundle(
            move(self.means), move(self.quats), move(self.log_scales), move(self.opacities),
            move(self.features), move(self.decoder_weight), dict(self.metadata), move(self.sh),
        )  # fmt: skip


def save_bundle(
    path: str | Path,
    gaussians: FeatureGaussians,
    decoder_weight: torch.Tensor,
    *,
    scene_id: str,
    backbone: str,
    extra_metadata: dict | None = None,
) -> Path:
    """Writes a bundle atomically (temp file in the same folder, then rename) and returns its path.

    Args:
        path: a `.safetensors` file or a folder (then `gaussians.safetensors` inside it).
        gaussians: the fitted Gaussians.
        decoder_weight: `[D, F, k, k]` weight of the per-scene decoder convolution.
        scene_id: the scene's id.
        backbone: Hub id or path of the backbone whose features were lifted.
        extra_metadata: JSON-serialisable values kept under the "extra" metadata key.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / BUNDLE_FILENAME
    if decoder_weight.ndim != 4 or decoder_weight.shape[1] != gaussians.feature_dim:
        raise ValueError(
            f"decoder_weight must have shape (D, {gaussians.feature_dim}, k, k), got {tuple(decoder_weight.shape)}"
        )
    with torch.no_grad():
        tensors = {
            "means": gaussians.means.float(),
            "quats": gaussians.normalized_quats.half(),
            "log_scales": gaussians.log_scales.half(),
            "opacities": gaussians.opacities.half(),
            "features": gaussians.features.half(),
            "decoder.weight": decoder_weight.float(),
            SH_KEY: gaussians.sh.half(),
        }
        tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    metadata = {
        "format": "fit3d-gaussian-bundle",
        "format_version": FORMAT_VERSION,
        "scene_id": scene_id,
        "backbone": backbone,
        "feature_dim": str(gaussians.feature_dim),
        "backbone_dim": str(decoder_weight.shape[0]),
        "sh_degree": str(gaussians.max_sh_degree),
        "num_gaussians": str(len(gaussians)),
        "extra": json.dumps(extra_metadata or {}),
    }
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return path


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / BUNDLE_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no Gaussian bundle at {path}")
    return path


def read_bundle_metadata(path: str | Path) -> dict:
    """The metadata of a bundle (cheap: reads only the header)."""
    path = _resolve(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    if metadata.get("format") != "fit3d-gaussian-bundle":
        raise ValueError(f"{path} is not a fit3d Gaussian bundle (metadata format={metadata.get('format')!r})")
    metadata["extra"] = json.loads(metadata.get("extra", "{}"))
    return metadata


def load_bundle(
    path: str | Path,
    *,
    include_sh: bool = False,
    expected_backbone: str | None = None,
    expected_backbone_dim: int | None = None,
    expected_feature_dim: int | None = None,
) -> GaussianBundle:
    """Loads a bundle's tensors (memory-mapped, CPU, stored dtypes).

    Args:
        path: the bundle file or the folder holding it.
        include_sh: also load the SH colours (Stage II does not need them).
        expected_backbone, expected_backbone_dim, expected_feature_dim: when given, a bundle made for
            another backbone or dimension is refused with `BundleMismatchError` naming both.
    """
    path = _resolve(path)
    metadata = read_bundle_metadata(path)
    checks = [
        ("backbone", expected_backbone, metadata.get("backbone")),
        ("backbone_dim", expected_backbone_dim, int(metadata.get("backbone_dim", -1))),
        ("feature_dim", expected_feature_dim, int(metadata.get("feature_dim", -1))),
    ]
    for name, expected, found in checks:
        if expected is not None and expected != found:
            raise BundleMismatchError(
                f"{path} was made for {name}={found!r}, but {name}={expected!r} was asked for; "
                f"lift the scene again with that backbone or pick the matching bundle"
            )
    keys = STAGE2_KEYS + ((SH_KEY,) if include_sh else ())
    with safe_open(str(path), framework="pt") as handle:
        missing = [key for key in keys if key not in handle.keys()]
        if missing:
            raise ValueError(f"{path} lacks the tensors {missing}")
        tensors = {key: handle.get_tensor(key) for key in keys}
    return GaussianBundle(
        means=tensors["means"],
        quats=tensors["quats"],
        log_scales=tensors["log_scales"],
        opacities=tensors["opacities"],
        features=tensors["features"],
        decoder_weight=tensors["decoder.weight"],
        metadata=metadata,
        sh=tensors.get(SH_KEY),
    )
