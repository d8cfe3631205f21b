"""Gaussian bundles: one scene's Stage I output, the input of Stage II, as one safetensors file.

A bundle holds the Gaussians' geometry, their low-dimensional features in fp16, the per-scene decoder
(a 3x3 convolution from the feature dimension F to the backbone dimension D) and the SH colours, plus
metadata naming the backbone so that Stage II can refuse a bundle made for another one.

Stage II needs only geometry, features and decoder: `load_bundle(..., include_sh=False)` reads just
those tensors through safetensors' memory map and never touches the SH colours.

Storage per Gaussian (format versions 3 and 4): means fp32 (12 B), quats/log-scales/opacities fp16 (16 B),
features fp16 (2F B) -- 156 B at F = 64, all that Stage II reads -- and the SH colours compressed to 5 B
(`sh_codec`: uint8 DC, 3 B; a uint16 code into a k-means codebook of the 45 higher-order values, 2 B):
161 B in all, against the 492 B of FiT3D's fp32 pickle (a third of it is 164 B). Per scene on top: the
fp16 decoder weight (D x F x 3 x 3: 442,368 B at D = 384, F = 64; loaded back as float32), the fp16
codebook (C x 45 x 2 B, C = `sh_codec.default_codebook_size(N)`: 4096 rows, 368,640 B, at 1M Gaussians;
2048 rows at 229k; 1024 at 196k) and the header (1.6 kB, 0.5 kB of it the checksums). Whole file / N at F = 64, D = 384: 161.81 B at
1M Gaussians, 163.74 B at 229,439 and 163.74 B at 196,000 (`tests/test_bundle.py` writes these files).
That is within 164 B from 178.8k Gaussians up, except from 204,800 (where the codebook doubles to 2048
rows: 164.07 B) to about 209.5k; under 147k the decoder weight alone passes 3 B per Gaussian.
`bundle_bytes_per_gaussian` gives the figure of a file.

`save_bundle(..., sh_storage="fp16")` (`fit3d lift --bundle_sh fp16`) keeps all 48 SH values in fp16 instead
(252 B per Gaussian). The codebook keeps only the dominant higher-order colour patterns; Stage I therefore
refines the DC terms and the codebook by rendering before it saves (`_Lifter.fit_compressed_colours`). On the
300-view synthetic benchmark scene the held-out PSNR of the bundle as saved is 41.0 dB, against 42.5 dB with
exact colours (33.2 dB with the k-means codebook alone). Features and geometry are stored the same way either
way, so Stage II is unaffected.

Older bundles still load: version 2 (fp32 decoder weight, codebook of up to 4096 rows whatever N) and
version 1 (also SH as one fp16 tensor, 252 B per Gaussian).

Integrity: the metadata key "checksums" holds the SHA-256 of every tensor (name, dtype, shape and bytes), so
that a flipped byte inside the tensor data, which safetensors cannot notice, is caught by
`load_bundle(..., verify=True)` or `verify_bundle` (Stage II verifies each scene once; `fit3d verify` checks
files in bulk). Bundles written before it existed load unverified, with a one-time notice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import BundleMismatchError, CorruptFileError, InputError, MissingInputError, file_problem
from ..utils import atomic_path
from .model import FeatureGaussians
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
    "tensor_checksums",
    "verify_bundle",
]

logger = logging.getLogger(__name__)

BUNDLE_FILENAME = "gaussians.safetensors"
# Version 3 stores the decoder weight in fp16: bumped so that a reader written for version 2 (which took
# the weight as stored, float32) refuses the file with a clear message rather than mixing dtypes.
# Version 4 adds the checksums (same tensors as version 3): a version-4 bundle without them is damaged, while
# one of versions 1-3 simply predates them. A version-3 reader refuses it, which it need not; the safe side.
FORMAT_VERSION = "4"
READABLE_VERSIONS = ("1", "2", "3", "4")
CHECKSUMMED_VERSIONS = ("4",)
STAGE2_KEYS = ("means", "quats", "log_scales", "opacities", "features", "decoder.weight")
SH_KEY = "sh"  # version 1: the SH as one fp16 [N, K, 3] tensor
SH_PREFIX = "sh."  # versions 2 and 3: the `CompressedSH` tensors, e.g. "sh.rest_codes"
SH_STORAGES = ("compressed", "fp16")  # the `sh_storage` choices of save_bundle
# metadata: JSON {tensor name: the first 128 bits (32 hex digits) of the SHA-256 of its name, dtype, shape and
# bytes}; 128 bits are ample against damage and keep the header small (the bundle's bytes per Gaussian count).
CHECKSUMS_KEY = "checksums"
CHECKSUM_HEX_DIGITS = 32
METADATA_CHECKSUM = "__metadata__"  # the checksums' entry covering the other metadata strings


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
    checksums = {**tensor_checksums(tensors), METADATA_CHECKSUM: _metadata_digest(metadata)}
    metadata[CHECKSUMS_KEY] = json.dumps(checksums, sort_keys=True)
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


def tensor_checksums(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Checksum of each tensor: SHA-256 over its name, dtype, shape and raw bytes (any dtype), first 128 bits."""
    return {name: _tensor_digest(name, tensor) for name, tensor in tensors.items()}


def _tensor_digest(name: str, tensor: torch.Tensor) -> str:
    digest = hashlib.sha256(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode())
    if tensor.numel():
        # A byte view works for every dtype (bfloat16 has no numpy twin) and copies nothing when contiguous.
        digest.update(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()[:CHECKSUM_HEX_DIGITS]


def _metadata_digest(metadata: dict[str, str]) -> str:
    """Checksum of the metadata strings as stored, the checksums themselves left out."""
    canonical = json.dumps({k: v for k, v in metadata.items() if k != CHECKSUMS_KEY}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:CHECKSUM_HEX_DIGITS]


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / BUNDLE_FILENAME
    if not path.is_file():
        raise MissingInputError(f"no Gaussian bundle at {path}")
    return path


def read_bundle_metadata(path: str | Path) -> dict:
    """The metadata of a bundle (cheap: reads only the header)."""
    path = _resolve(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise CorruptFileError(file_problem(path, f"not a readable safetensors file ({error})")) from error
    if metadata.get("format") != "fit3d-gaussian-bundle":
        raise InputError(file_problem(path, f"not a fit3d Gaussian bundle (metadata format={metadata.get('format')!r})"))
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise InputError(
            f"{path} has bundle format version {metadata.get('format_version')!r}; this fit3d_hf reads "
            f"{READABLE_VERSIONS}: upgrade fit3d_hf or lift the scene again"
        )
    for key in ("extra", "provenance", CHECKSUMS_KEY):
        if key in metadata:
            try:
                metadata[key] = json.loads(metadata[key])
            except ValueError as error:
                raise CorruptFileError(file_problem(path, f"metadata {key!r} is not valid JSON ({error})")) from error
    metadata.setdefault("extra", {})
    metadata.setdefault("provenance", {})
    for key in ("backbone_dim", "feature_dim", "num_gaussians"):
        if key in metadata and not str(metadata[key]).isdigit():
            raise CorruptFileError(file_problem(path, f"metadata {key!r} is {metadata[key]!r}, not a whole number"))
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
    if verify:
        _verify_tensors(path, metadata, tensors)
    _check_tensors(path, metadata, tensors)
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
    path = _resolve(path)
    metadata = read_bundle_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = tuple(handle.keys())
    except Exception as error:
        raise CorruptFileError(file_problem(path, f"not a readable safetensors file ({error})")) from error
    tensors = _read_tensors(path, names)
    checksummed = _verify_tensors(path, metadata, tensors, all_tensors=True)
    _check_tensors(path, metadata, tensors)
    _check_finite(path, tensors)
    required = STAGE2_KEYS + _sh_keys(metadata)
    missing = [key for key in required if key not in tensors]
    if missing:
        raise CorruptFileError(file_problem(path, f"lacks the tensors {missing}"))
    if SH_KEY not in tensors:
        CompressedSH.from_tensors(tensors, SH_PREFIX)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"path": str(path), "tensors": len(tensors), "bytes": size, "checksummed": checksummed}


@functools.cache
def _notice_unverifiable() -> None:
    # Once per process: a folder of old bundles would otherwise repeat it for every scene.
    logger.warning(
        "Gaussian bundles written before fit3d-hf recorded checksums load without verification "
        "(lift the scenes again to add them); first one: see the debug log"
    )


def _verify_tensors(path: Path, metadata: dict, tensors: dict[str, torch.Tensor], all_tensors: bool = False) -> bool:
    """Compares `tensors` with the stored checksums; False (and a notice) when the bundle has none."""
    checksums = metadata.get(CHECKSUMS_KEY)
    if checksums is None and metadata["format_version"] in CHECKSUMMED_VERSIONS:
        raise CorruptFileError(file_problem(path, f"a version-{metadata['format_version']} bundle without its checksums: the header is damaged"))
    if checksums is None:
        logger.debug("%s has no checksums: loaded unverified", path)
        _notice_unverifiable()
        return False
    if not isinstance(checksums, dict):
        raise CorruptFileError(file_problem(path, "metadata 'checksums' is not a table of tensor digests"))
    if all_tensors and set(checksums) - {METADATA_CHECKSUM} != set(tensors):
        raise CorruptFileError(
            file_problem(path, f"holds tensors {sorted(tensors)} but its checksums name {sorted(checksums)}")
        )
    if METADATA_CHECKSUM in checksums:
        with safe_open(str(path), framework="pt") as handle:  # the header only: the strings as stored
            raw = dict(handle.metadata() or {})
        if _metadata_digest(raw) != checksums[METADATA_CHECKSUM]:
            raise CorruptFileError(file_problem(path, "its metadata fails its checksum: the header is damaged"))
    for name, tensor in tensors.items():
        if name not in checksums:
            raise CorruptFileError(file_problem(path, f"tensor {name!r} has no checksum"))
        if _tensor_digest(name, tensor) != checksums[name]:
            raise CorruptFileError(
                file_problem(path, f"tensor {name!r} fails its checksum: the file is damaged; lift the scene again")
            )
    return True


# dtypes each tensor may have been saved with (versions 1-3), and its shape as a function of N, F, D.
_EXPECTED_DTYPES = {
    "means": (torch.float32,),
    "quats": (torch.float16, torch.float32),
    "log_scales": (torch.float16, torch.float32),
    "opacities": (torch.float16, torch.float32),
    "features": (torch.float16, torch.float32),
    "decoder.weight": (torch.float16, torch.float32),
    SH_KEY: (torch.float16, torch.float32),
    SH_PREFIX + "dc_codes": (torch.uint8,),
    SH_PREFIX + "dc_offset": (torch.float16, torch.float32),
    SH_PREFIX + "dc_step": (torch.float16, torch.float32),
    SH_PREFIX + "rest_codebook": (torch.float16, torch.float32),
    SH_PREFIX + "rest_codes": (torch.uint16, torch.int16, torch.int32, torch.int64),
}


def _check_tensors(path: Path, metadata: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Refuses tensors whose dtype or shape contradicts the bundle's metadata (a damaged or forged file),
    so that no reader later fails with an IndexError or a shape error far from the file."""

    def fail(problem: str):
        raise CorruptFileError(file_problem(path, problem))

    for name, tensor in tensors.items():
        allowed = _EXPECTED_DTYPES.get(name)
        if allowed is not None and tensor.dtype not in allowed:
            fail(f"tensor {name!r} has dtype {tensor.dtype}, expected one of {[str(d) for d in allowed]}")
    n = int(metadata.get("num_gaussians", tensors["means"].shape[0] if "means" in tensors else 0))
    f, d = int(metadata.get("feature_dim", -1)), int(metadata.get("backbone_dim", -1))
    shapes = {"means": (n, 3), "quats": (n, 4), "log_scales": (n, 3), "opacities": (n,), "features": (n, f)}
    for name, shape in shapes.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            fail(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape} (N = {n}, F = {f})")
    weight = tensors.get("decoder.weight")
    if weight is not None and (weight.ndim != 4 or weight.shape[:2] != (d, f) or weight.shape[2] != weight.shape[3]):
        fail(f"tensor 'decoder.weight' has shape {tuple(weight.shape)}, expected ({d}, {f}, k, k)")
    if SH_KEY in tensors and (tensors[SH_KEY].ndim != 3 or tensors[SH_KEY].shape[0] != n or tensors[SH_KEY].shape[2] != 3):
        fail(f"tensor 'sh' has shape {tuple(tensors[SH_KEY].shape)}, expected ({n}, K, 3)")
    if SH_PREFIX + "rest_codes" in tensors:
        _check_compressed_sh(path, n, {k[len(SH_PREFIX) :]: v for k, v in tensors.items() if k.startswith(SH_PREFIX)}, fail)


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuses NaN or infinite geometry, features or decoder weights (reads every value: `verify_bundle` only;
    `load_bundle` stays lazy, its tensors memory-mapped until used)."""
    for name in ("means", "quats", "log_scales", "opacities", "features", "decoder.weight"):
        if name in tensors and tensors[name].is_floating_point() and not torch.isfinite(tensors[name]).all():
            raise CorruptFileError(file_problem(path, f"tensor {name!r} holds NaN or infinite values"))


def _check_compressed_sh(path: Path, n: int, sh: dict[str, torch.Tensor], fail) -> None:
    missing = [SH_PREFIX + name for name in CompressedSH.TENSOR_NAMES if name not in sh]
    if missing:
        fail(f"lacks the tensors {missing}")
    codebook, codes = sh["rest_codebook"], sh["rest_codes"]
    if sh["dc_codes"].shape != (n, 3) or codes.shape != (n,):
        fail(f"compressed SH codes have shapes {tuple(sh['dc_codes'].shape)} and {tuple(codes.shape)}, expected ({n}, 3) and ({n},)")
    if sh["dc_offset"].shape != (3,) or sh["dc_step"].shape != (3,):
        fail("compressed SH DC offset and step must have shape (3,)")
    if codebook.ndim != 2 or codebook.shape[0] < 1 or codebook.shape[1] % 3:
        fail(f"tensor 'sh.rest_codebook' has shape {tuple(codebook.shape)}, expected (C, 3 * (K - 1))")
    if n and (int(codes.to(torch.int64).max()) >= codebook.shape[0] or int(codes.to(torch.int64).min()) < 0):
        fail(f"SH codes address rows past the {codebook.shape[0]}-row codebook")


def _sh_is_fp16(metadata: dict) -> bool:
    """Version 1 always stored the SH colours as one fp16 tensor; later versions do with sh_storage="fp16"."""
    return metadata["format_version"] == "1" or metadata.get("sh_codec") == "fp16"


def _sh_keys(metadata: dict) -> tuple[str, ...]:
    if _sh_is_fp16(metadata):
        return (SH_KEY,)
    return tuple(SH_PREFIX + name for name in CompressedSH.TENSOR_NAMES)


def _read_tensors(path: Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            missing = [key for key in keys if key not in handle.keys()]
            if missing:
                raise CorruptFileError(file_problem(path, f"lacks the tensors {missing}"))
            return {key: handle.get_tensor(key) for key in keys}
    except CorruptFileError:
        raise
    except Exception as error:  # safetensors' own errors for a damaged header or data
        raise CorruptFileError(file_problem(path, f"its tensors cannot be read ({error})")) from error


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
