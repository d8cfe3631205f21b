"""The on-disk format of Gaussian bundles (`bundle.py` writes and reads them): constants and versions, the
header reader, the raw tensor reader, and the comparison of a bundle's recorded backbone (provenance) with
Stage II's.

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
refines the DC terms and the codebook by rendering before it saves
(`fit3d_hf.lifting.lifter.Lifter.refine_compressed_colours`). On the 300-view synthetic benchmark scene the
held-out PSNR of the bundle as saved is 41.0 dB, against 42.5 dB with exact colours (33.2 dB with the k-means
codebook alone). Features and geometry are stored the same way either
way, so Stage II is unaffected.

Older bundles still load: version 2 (fp32 decoder weight, codebook of up to 4096 rows whatever N) and
version 1 (also SH as one fp16 tensor, 252 B per Gaussian).

Integrity: the metadata key "checksums" holds the SHA-256 of every tensor (name, dtype, shape and bytes), so
that a flipped byte inside the tensor data, which safetensors cannot notice, is caught by
`load_bundle(..., verify=True)` or `verify_bundle` (Stage II verifies each scene once; `fit3d verify` checks
files in bulk; `bundle_integrity.py`). Bundles written before it existed load unverified, with a one-time
notice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CorruptFileError, InputError, MissingInputError, file_problem
from .sh_codec import CompressedSH

__all__ = [
    "BUNDLE_FILENAME",
    "CHECKSUMMED_VERSIONS",
    "CHECKSUMS_KEY",
    "CHECKSUM_HEX_DIGITS",
    "FORMAT_VERSION",
    "METADATA_CHECKSUM",
    "READABLE_VERSIONS",
    "SH_KEY",
    "SH_PREFIX",
    "SH_STORAGES",
    "STAGE2_KEYS",
    "check_provenance",
    "read_bundle_metadata",
    "read_tensors",
    "resolve_bundle_path",
    "sh_is_fp16",
    "sh_tensor_keys",
]

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


def resolve_bundle_path(path: str | Path) -> Path:
    """The bundle file at `path` (a `.safetensors` file, or a folder holding `gaussians.safetensors`)."""
    path = Path(path)
    if path.is_dir():
        path = path / BUNDLE_FILENAME
    if not path.is_file():
        raise MissingInputError(f"no Gaussian bundle at {path}")
    return path


def read_bundle_metadata(path: str | Path) -> dict:
    """The metadata of a bundle (cheap: reads only the header)."""
    path = resolve_bundle_path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise CorruptFileError(file_problem(path, f"not a readable safetensors file ({error})")) from error
    if metadata.get("format") != "fit3d-gaussian-bundle":
        raise InputError(
            file_problem(path, f"not a fit3d Gaussian bundle (metadata format={metadata.get('format')!r})")
        )
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
                raise CorruptFileError(
                    file_problem(path, f"metadata {key!r} is not valid JSON ({error})")
                ) from error
    metadata.setdefault("extra", {})
    metadata.setdefault("provenance", {})
    for key in ("backbone_dim", "feature_dim", "num_gaussians"):
        if key in metadata and not str(metadata[key]).isdigit():
            raise CorruptFileError(
                file_problem(path, f"metadata {key!r} is {metadata[key]!r}, not a whole number")
            )
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
            differences.append(
                f"backbone {lifted_with!r} vs {expected.get('backbone_id') or expected.get('backbone')!r}"
            )
    for key in _PROVENANCE_KEYS:
        if key in recorded and key in expected and recorded[key] != expected[key]:
            differences.append(f"{key} {recorded[key]!r} vs {expected[key]!r}")
    return differences


def sh_is_fp16(metadata: dict) -> bool:
    """Version 1 always stored the SH colours as one fp16 tensor; later versions do with sh_storage="fp16"."""
    return metadata["format_version"] == "1" or metadata.get("sh_codec") == "fp16"


def sh_tensor_keys(metadata: dict) -> tuple[str, ...]:
    """Names of the tensors that hold a bundle's SH colours."""
    if sh_is_fp16(metadata):
        return (SH_KEY,)
    return tuple(SH_PREFIX + name for name in CompressedSH.TENSOR_NAMES)


def read_tensors(path: Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors `keys` of a bundle (memory-mapped, as stored); `CorruptFileError` when one is missing or
    unreadable."""
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
