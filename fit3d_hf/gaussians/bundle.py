"""Gaussian bundles: one scene's Stage I output, the input of Stage II, as one safetensors file.

A bundle holds the Gaussians' geometry, their low-dimensional features in fp16, the per-scene decoder
(a 3x3 convolution from the feature dimension F to the backbone dimension D) and the SH colours, plus
metadata naming the backbone so that Stage II can refuse a bundle made for another one.

Stage II needs only geometry, features and decoder: `load_bundle(..., include_sh=False)` reads just
those tensors through safetensors' memory map and never touches the SH colours.

Storage per Gaussian (format version 3): means fp32 (12 B), quats/log-scales/opacities fp16 (16 B),
features fp16 (2F B) -- 156 B at F = 64, all that Stage II reads -- and the SH colours compressed to 5 B
(`sh_codec`: uint8 DC, 3 B; a uint16 code into a k-means codebook of the 45 higher-order values, 2 B):
161 B in all, against the 492 B of FiT3D's fp32 pickle (a third of it is 164 B). Per scene on top: the
fp16 decoder weight (D x F x 3 x 3: 442,368 B at D = 384, F = 64; loaded back as float32), the fp16
codebook (C x 45 x 2 B, C = `sh_codec.default_codebook_size(N)`: 4096 rows, 368,640 B, at 1M Gaussians;
2048 rows at 229k; 1024 at 196k) and the header (1.1 kB). Whole file / N at F = 64, D = 384: 161.81 B at
1M Gaussians, 163.74 B at 229,439 and 163.73 B at 196,000 (`tests/test_bundle.py` writes these files).
That is within 164 B from 178.6k Gaussians up, except from 204,800 (where the codebook doubles to 2048
rows: 164.07 B) to 209,285; under 147k the decoder weight alone passes 3 B per Gaussian.
`bundle_bytes_per_gaussian` gives the figure of a file.

`save_bundle(..., sh_storage="fp16")` (`fit3d lift --bundle_sh fp16`) keeps all 48 SH values in fp16 instead
(252 B per Gaussian). The codebook keeps only the dominant higher-order colour patterns; Stage I therefore
refines the DC terms and the codebook by rendering before it saves (`_Lifter.fit_compressed_colours`). On the
300-view synthetic benchmark scene the held-out PSNR of the bundle as saved is 41.0 dB, against 42.5 dB with
exact colours (33.2 dB with the k-means codebook alone). Features and geometry are stored the same way either
way, so Stage II is unaffected.

Older bundles still load: version 2 (fp32 decoder weight, codebook of up to 4096 rows whatever N) and
version 1 (also SH as one fp16 tensor, 252 B per Gaussian).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import BundleMismatchError
from ..utils import atomic_path
from .model import FeatureGaussians, inverse_sigmoid
from .sh_codec import CompressedSH, encode_sh

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
]

BUNDLE_FILENAME = "gaussians.safetensors"
# Version 3 stores the decoder weight in fp16: bumped so that a reader written for version 2 (which took
# the weight as stored, float32) refuses the file with a clear message rather than mixing dtypes.
FORMAT_VERSION = "3"
READABLE_VERSIONS = ("1", "2", "3")
STAGE2_KEYS = ("means", "quats", "log_scales", "opacities", "features", "decoder.weight")
SH_KEY = "sh"  # version 1: the SH as one fp16 [N, K, 3] tensor
SH_PREFIX = "sh."  # versions 2 and 3: the `CompressedSH` tensors, e.g. "sh.rest_codes"
SH_STORAGES = ("compressed", "fp16")  # the `sh_storage` choices of save_bundle


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
            raise ValueError(f"bundle {self.scene_id!r} was loaded without SH colours: load it with include_sh=True")
        max_sh_degree = int(round(self.sh.shape[1] ** 0.5)) - 1
        # fp16 opacities may be exactly 0 or 1: keep the logits finite.
        opacities = self.opacities.float().clamp(1e-6, 1 - 1e-6)
        gaussians = FeatureGaussians(
            self.means.float(), self.quats.float(), self.log_scales.float(), inverse_sigmoid(opacities),
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
    with torch.no_grad():
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
                sh = encode_sh(gaussians.sh, codebook_size=sh_codebook_size, iterations=sh_kmeans_iterations, seed=seed)
            if len(sh) != len(gaussians):
                raise ValueError(f"compressed_sh holds {len(sh)} Gaussians, the bundle {len(gaussians)}")
            tensors.update(sh.tensors(SH_PREFIX))
            codec = {"sh_codec": "uint8-dc+vq-rest", "sh_codebook_size": str(len(sh.rest_codebook))}
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
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
        _sort_header(temporary)
    return path


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
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{path} has bundle format version {metadata.get('format_version')!r}; this fit3d_hf reads "
            f"{READABLE_VERSIONS}: upgrade fit3d_hf or lift the scene again"
        )
    metadata["extra"] = json.loads(metadata.get("extra", "{}"))
    metadata["provenance"] = json.loads(metadata.get("provenance", "{}"))
    return metadata


# Provenance entries that must agree between a bundle and the backbone Stage II trains: each changes the
# target features. A key missing on either side (older bundles) is not compared.
_PROVENANCE_KEYS = (
    "backbone_model_type", "backbone_dim", "patch_size", "image_mean", "image_std", "resize", "pos_embed_interpolation",
)  # fmt: skip


def check_provenance(metadata: dict, expected: dict) -> list[str]:
    """How a bundle's recorded backbone differs from `expected` (both `DenseFeatureExtractor.provenance()`
    dicts; `metadata` as `read_bundle_metadata` returns it). Empty when they agree.

    The backbone is the same when the weights fingerprints agree (whatever the id it was loaded by), or, when
    either side lacks one, when the ids agree (a bundle without provenance is compared by its "backbone" key).
    """
    recorded = dict(metadata.get("provenance") or {})
    differences = []
    ours, theirs = expected.get("weights_sha256"), recorded.get("weights_sha256")
    if ours and theirs:
        if ours != theirs:
            differences.append(
                f"backbone weights differ (lifted with {recorded.get('backbone_id') or metadata.get('backbone')!r}, "
                f"fingerprint {theirs[:12]}; this backbone {expected.get('backbone_id')!r}, {ours[:12]})"
            )
    else:
        lifted_with = recorded.get("backbone_id") or metadata.get("backbone")
        names = {expected.get("backbone"), expected.get("backbone_id")} - {None, ""}
        if lifted_with and names and lifted_with not in names:
            differences.append(f"backbone {lifted_with!r} vs {expected.get('backbone_id') or expected.get('backbone')!r}")
    for key in _PROVENANCE_KEYS:
        if key in recorded and key in expected and recorded[key] != expected[key]:
            differences.append(f"{key} {recorded[key]!r} vs {expected[key]!r}")
    return differences


def load_bundle(
    path: str | Path,
    *,
    include_sh: bool = False,
    expected_backbone: str | None = None,
    expected_backbone_dim: int | None = None,
    expected_feature_dim: int | None = None,
) -> GaussianBundle:
    """Loads a bundle's tensors (memory-mapped, CPU, stored dtypes; the decoder weight as float32).

    Args:
        path: the bundle file or the folder holding it.
        include_sh: also load the SH colours (Stage II does not need them): `[N, K, 3]`, decoded to
            float32 when compressed, fp16 as stored otherwise (version 1, or `sh_storage="fp16"`).
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
    keys = STAGE2_KEYS
    if include_sh:
        keys += _sh_keys(metadata)
    tensors = _read_tensors(path, keys)
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


def _sh_is_fp16(metadata: dict) -> bool:
    """Version 1 always stored the SH colours as one fp16 tensor; later versions do with sh_storage="fp16"."""
    return metadata["format_version"] == "1" or metadata.get("sh_codec") == "fp16"


def _sh_keys(metadata: dict) -> tuple[str, ...]:
    if _sh_is_fp16(metadata):
        return (SH_KEY,)
    return tuple(SH_PREFIX + name for name in CompressedSH.TENSOR_NAMES)


def _read_tensors(path: Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        missing = [key for key in keys if key not in handle.keys()]
        if missing:
            raise ValueError(f"{path} lacks the tensors {missing}")
        return {key: handle.get_tensor(key) for key in keys}


def load_compressed_sh(path: str | Path, *, device: torch.device | str | None = None) -> CompressedSH:
    """A bundle's SH colours in compressed form, as stored (CPU tensors).

    A version-1 bundle (fp16 SH) is compressed on the fly, on `device` (default: CUDA when available;
    k-means over a million Gaussians takes minutes on a CPU).
    """
    path = _resolve(path)
    metadata = read_bundle_metadata(path)
    tensors = _read_tensors(path, _sh_keys(metadata))
    if _sh_is_fp16(metadata):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return encode_sh(tensors[SH_KEY].to(device))
    return CompressedSH.from_tensors(tensors, SH_PREFIX)


def bundle_bytes_per_gaussian(path: str | Path) -> float:
    """File size of a bundle divided by its number of Gaussians: everything counted (header, decoder
    weight, SH codebook), the figure to hold against FiT3D's 492 B per Gaussian."""
    path = _resolve(path)
    count = int(read_bundle_metadata(path)["num_gaussians"])
    if count <= 0:
        raise ValueError(f"{path} holds no Gaussians")
    return path.stat().st_size / count
