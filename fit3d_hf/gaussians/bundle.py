"""Gaussian bundles: one scene's Stage I output, the input of Stage II, as one safetensors file.

A bundle holds the Gaussians' geometry, their low-dimensional features in fp16, the per-scene decoder
(a 3x3 convolution from the feature dimension F to the backbone dimension D) and the SH colours, plus
metadata naming the backbone so that Stage II can refuse a bundle made for another one. This module writes
and reads them (`save_bundle`, `load_bundle`, `verify_bundle`); the format itself (storage per Gaussian,
versions, header) is described in `bundle_format.py`, the checksums and damage checks in
`bundle_integrity.py`.

Stage II needs only geometry, features and decoder: `load_bundle(..., include_sh=False)` reads just
those tensors through safetensors' memory map and never touches the SH colours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import BundleMismatchError, CorruptFileError, file_problem
from ..utils import atomic_path
from .bundle_format import (
    BUNDLE_FILENAME,
    CHECKSUMS_KEY,
    FORMAT_VERSION,
    METADATA_CHECKSUM,
    SH_KEY,
    SH_PREFIX,
    SH_STORAGES,
    STAGE2_KEYS,
    check_provenance,
    read_bundle_metadata,
    read_tensors,
    resolve_bundle_path,
    sh_is_fp16,
    sh_tensor_keys,
)
from .bundle_integrity import check_finite, check_tensors, metadata_digest, tensor_checksums, verify_checksums
from .bundle_integrity import tensor_digest as _tensor_digest  # noqa: F401 (fit3d_hf/checkpoints.py imports it here)
from .model import FeatureGaussians
from .sh_codec import CompressedSH, encode_sh

# The format's names are re-exported: Stage I/II, the CLI and the builders import them from here.
__all__ = [
    "BUNDLE_FILENAME",
    "FORMAT_VERSION",
    "BundleMismatchError",
    "GaussianBundle",
    "bundle_bytes_per_gaussian",
    "check_provenance",
    "load_bundle",
    "load_compressed_sh",
    "read_bundle_metadata",
    "save_bundle",
    "tensor_checksums",
    "verify_bundle",
]


@dataclass
class GaussianBundle:
    """The tensors of one scene's bundle (activated opacities, log scales, normalised quaternions).

    Shapes: means `[N, 3]`, quats `[N, 4]`, log_scales `[N, 3]`, opacities `[N]`, features `[N, F]`,
    decoder_weight `[D, F, k, k]` (float32 as loaded, whatever the stored dtype), sh `[N, K, 3]` or None
    when loaded without colours.
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

    def to_gaussians(self, active_sh_degree: int | None = None) -> FeatureGaussians:
        """The bundle as `FeatureGaussians` (float32, CPU), e.g. to render it; needs the SH colours.

        Args:
            active_sh_degree: the SH degree to render with (default: the highest stored).
        """
        if self.sh is None:
            raise ValueError(
                f"bundle {self.scene_id!r} was loaded without SH colours: load it with include_sh=True"
            )
        max_sh_degree = int(round(self.sh.shape[1] ** 0.5)) - 1
        # fp16 opacities may be exactly 0 or 1: keep the logits finite.
        opacities = self.opacities.float().clamp(1e-6, 1 - 1e-6)
        gaussians = FeatureGaussians(
            self.means.float(), self.quats.float(), self.log_scales.float(), torch.logit(opacities),
            self.sh.float(), self.features.float(), max_sh_degree=max_sh_degree,
        )  # fmt: skip
        gaussians.active_sh_degree = max_sh_degree if active_sh_degree is None else active_sh_degree
        return gaussians

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
    sh_storage: str = "compressed",
    compressed_sh: CompressedSH | None = None,
    sh_codebook_size: int | None = None,
    sh_kmeans_iterations: int = 10,
    seed: int = 0,
    provenance: dict | None = None,
) -> Path:
    """Writes a bundle atomically (temp file in the same folder, then rename) and returns its path.

    The SH colours are compressed (`sh_codec.encode_sh`, on the device of the Gaussians: fast on a GPU;
    on a CPU the k-means takes about N x C x 45 x 20 flops, C = `default_codebook_size(N)`); the rest
    is stored as the module docstring says.
    Same inputs and seed give the same bytes on the CPU.

    Args:
        path: a `.safetensors` file or a folder (then `gaussians.safetensors` inside it).
        gaussians: the fitted Gaussians.
        decoder_weight: `[D, F, k, k]` weight of the per-scene decoder convolution.
        scene_id: the scene's id.
        backbone: Hub id or path of the backbone whose features were lifted.
        extra_metadata: JSON-serialisable values kept under the "extra" metadata key.
        sh_storage: "compressed" (the default, 5 B per Gaussian, see the module docstring) or "fp16" (all
            48 SH values in half precision, 96 B per Gaussian: RGB renders keep their view-dependent detail).
        compressed_sh: with "compressed", the colours already compressed (Stage I refines the codebook by
            rendering; `gaussians.sh` is then not read); by default they are compressed here.
        sh_codebook_size: rows of the higher-order SH codebook (default `sh_codec.default_codebook_size`:
            the largest power of two <= N / 100 in [16, 4096], so that it amortises over the scene).
        sh_kmeans_iterations: k-means iterations fitting that codebook.
        seed: seed of the k-means initialisation.
        provenance: how the target features were made (`DenseFeatureExtractor.provenance()`: backbone id and
            revision, weights fingerprint, normalisation, resize rule, position-embedding resampling), stored as
            JSON under the "provenance" key; `check_provenance` compares it with Stage II's backbone.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / BUNDLE_FILENAME
    if sh_storage not in SH_STORAGES:
        raise ValueError(f"sh_storage must be one of {SH_STORAGES}, got {sh_storage!r}")
    if decoder_weight.ndim != 4 or decoder_weight.shape[1] != gaussians.feature_dim:
        raise ValueError(
            f"decoder_weight must have shape (D, {gaussians.feature_dim}, k, k), got {tuple(decoder_weight.shape)}"
        )
    tensors, codec = _stored_tensors(
        gaussians, decoder_weight, sh_storage, compressed_sh, sh_codebook_size, sh_kmeans_iterations, seed
    )
    metadata = {
        "format": "fit3d-gaussian-bundle",
        "format_version": FORMAT_VERSION,
        "scene_id": scene_id,
        "backbone": backbone,
        "feature_dim": str(gaussians.feature_dim),
        "backbone_dim": str(decoder_weight.shape[0]),
        "sh_degree": str(gaussians.max_sh_degree),
        **codec,
        "num_gaussians": str(len(gaussians)),
        "extra": json.dumps(extra_metadata or {}),
    }
    if provenance:
        metadata["provenance"] = json.dumps(provenance, sort_keys=True)
    checksums = {**tensor_checksums(tensors), METADATA_CHECKSUM: metadata_digest(metadata)}
    metadata[CHECKSUMS_KEY] = json.dumps(checksums, sort_keys=True)
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
        _sort_header(temporary)
    return path


@torch.no_grad()
def _stored_tensors(gaussians, decoder_weight, sh_storage, compressed_sh, sh_codebook_size, sh_kmeans_iterations,
                    seed) -> tuple[dict[str, torch.Tensor], dict[str, str]]:  # fmt: skip
    """The tensors a bundle stores (CPU, contiguous, in their stored dtypes) and the metadata of its SH codec."""
    tensors = {
        "means": gaussians.means.float(),
        "quats": gaussians.normalized_quats.half(),
        "log_scales": gaussians.log_scales.half(),
        "opacities": gaussians.opacities.half(),
        "features": gaussians.features.half(),
        # fp16 halves the largest per-scene cost (0.44 MB at D = 384, F = 64); the decoder is a linear
        # map, so its relative error stays that of half precision (~5e-4).
        "decoder.weight": decoder_weight.half(),
    }
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    if sh_storage == "fp16":
        tensors[SH_KEY] = gaussians.sh.detach().half().cpu().contiguous()
        codec = {"sh_codec": "fp16"}
    else:
        sh = compressed_sh
        if sh is None:
            sh = encode_sh(
                gaussians.sh, codebook_size=sh_codebook_size, iterations=sh_kmeans_iterations, seed=seed
            )
        if len(sh) != len(gaussians):
            raise ValueError(f"compressed_sh holds {len(sh)} Gaussians, the bundle {len(gaussians)}")
        tensors.update(sh.tensors(SH_PREFIX))
        codec = {"sh_codec": "uint8-dc+vq-rest", "sh_codebook_size": str(len(sh.rest_codebook))}
    return tensors, codec


def _sort_header(path: Path) -> None:
    """Rewrites a safetensors header with sorted keys, in place and at the same length.

    safetensors writes the metadata in Rust hash-map order, which changes from call to call; sorting makes
    the same bundle the same bytes (reproducible files, stable hashes on the Hub). The header is the
    documented 8-byte little-endian length + JSON padded with spaces; readers ignore key order.
    """
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) > length:  # cannot happen for a reordering; keep the file valid regardless
            return
        handle.seek(8)
        handle.write(canonical.ljust(length, b" "))


def load_bundle(
    path: str | Path,
    *,
    include_sh: bool = False,
    expected_backbone: str | None = None,
    expected_backbone_dim: int | None = None,
    expected_feature_dim: int | None = None,
    verify: bool = False,
) -> GaussianBundle:
    """Loads a bundle's tensors (memory-mapped, CPU, stored dtypes; the decoder weight as float32).

    Args:
        path: the bundle file or the folder holding it.
        include_sh: also load the SH colours (Stage II does not need them): `[N, K, 3]`, decoded to
            float32 when compressed, fp16 as stored otherwise (version 1, or `sh_storage="fp16"`).
        expected_backbone, expected_backbone_dim, expected_feature_dim: when given, a bundle made for
            another backbone or dimension is refused with `BundleMismatchError` naming both.
        verify: check the tensors read against the checksums in the metadata (`CorruptFileError` on a
            mismatch; about 1 s per GB read). A bundle without checksums loads with a one-time notice.

    Raises:
        MissingInputError: no bundle at `path`.
        CorruptFileError: the file is damaged (unreadable header, tensors of the wrong dtype or shape,
            a failed checksum).
        InputError: not a bundle, or a format version this library does not read.
    """
    path = resolve_bundle_path(path)
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
    keys = STAGE2_KEYS
    if include_sh:
        keys += sh_tensor_keys(metadata)
    tensors = read_tensors(path, keys)
    if verify:
        verify_checksums(path, metadata, tensors)
    check_tensors(path, metadata, tensors)
    if include_sh and SH_KEY not in tensors:
        tensors[SH_KEY] = CompressedSH.from_tensors(tensors, SH_PREFIX).decode()
    return GaussianBundle(
        means=tensors["means"],
        quats=tensors["quats"],
        log_scales=tensors["log_scales"],
        opacities=tensors["opacities"],
        features=tensors["features"],
        # fp16 since version 3, fp32 before: float32 for every reader (a conv with fp32 features needs it).
        decoder_weight=tensors["decoder.weight"].float(),
        metadata=metadata,
        sh=tensors.get(SH_KEY),
    )


def verify_bundle(path: str | Path) -> dict:
    """Checks every tensor of a bundle against its checksums and its declared shapes.

    Returns:
        `{"path", "tensors", "bytes", "checksummed"}`; `checksummed` is False for a bundle written
        before checksums existed (its tensors are then only checked for dtype and shape).

    Raises:
        CorruptFileError / InputError / MissingInputError as `load_bundle`.
    """
    path = resolve_bundle_path(path)
    metadata = read_bundle_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = tuple(handle.keys())
    except Exception as error:
        raise CorruptFileError(file_problem(path, f"not a readable safetensors file ({error})")) from error
    tensors = read_tensors(path, names)
    checksummed = verify_checksums(path, metadata, tensors, all_tensors=True)
    check_tensors(path, metadata, tensors)
    check_finite(path, tensors)
    required = STAGE2_KEYS + sh_tensor_keys(metadata)
    missing = [key for key in required if key not in tensors]
    if missing:
        raise CorruptFileError(file_problem(path, f"lacks the tensors {missing}"))
    if SH_KEY not in tensors:
        CompressedSH.from_tensors(tensors, SH_PREFIX)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"path": str(path), "tensors": len(tensors), "bytes": size, "checksummed": checksummed}


def load_compressed_sh(path: str | Path, *, device: torch.device | str | None = None) -> CompressedSH:
    """A bundle's SH colours in compressed form, as stored (CPU tensors).

    A version-1 bundle (fp16 SH) is compressed on the fly, on `device` (default: CUDA when available;
    k-means over a million Gaussians takes minutes on a CPU).
    """
    path = resolve_bundle_path(path)
    metadata = read_bundle_metadata(path)
    tensors = read_tensors(path, sh_tensor_keys(metadata))
    if sh_is_fp16(metadata):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return encode_sh(tensors[SH_KEY].to(device))
    return CompressedSH.from_tensors(tensors, SH_PREFIX)


def bundle_bytes_per_gaussian(path: str | Path) -> float:
    """File size of a bundle divided by its number of Gaussians: everything counted (header, decoder
    weight, SH codebook), the figure to hold against FiT3D's 492 B per Gaussian."""
    path = resolve_bundle_path(path)
    count = int(read_bundle_metadata(path)["num_gaussians"])
    if count <= 0:
        raise ValueError(f"{path} holds no Gaussians")
    return path.stat().st_size / count
