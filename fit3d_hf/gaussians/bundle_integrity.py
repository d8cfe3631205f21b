"""The integrity of Gaussian bundles: tensor checksums, and the checks that refuse a damaged or forged file
(checksums, dtypes and shapes against the metadata, finite values) with a `CorruptFileError` that names it.

The metadata key "checksums" holds the SHA-256 (first 128 bits) of every tensor (name, dtype, shape and bytes)
and of the other metadata strings, so that a flipped byte inside the tensor data, which safetensors cannot
notice, is caught.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CorruptFileError, file_problem
from .bundle_format import (
    CHECKSUM_HEX_DIGITS,
    CHECKSUMMED_VERSIONS,
    CHECKSUMS_KEY,
    METADATA_CHECKSUM,
    SH_KEY,
    SH_PREFIX,
)
from .sh_codec import CompressedSH

__all__ = [
    "check_finite",
    "check_tensors",
    "metadata_digest",
    "tensor_checksums",
    "tensor_digest",
    "verify_checksums",
]

logger = logging.getLogger(__name__)


def tensor_checksums(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Checksum of each tensor: SHA-256 over its name, dtype, shape and raw bytes (any dtype), first 128 bits."""
    return {name: tensor_digest(name, tensor) for name, tensor in tensors.items()}


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """The checksum of one tensor (see `tensor_checksums`); Stage I checkpoints use it too."""
    digest = hashlib.sha256(
        f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode()
    )
    if tensor.numel():
        # A byte view works for every dtype (bfloat16 has no numpy twin) and copies nothing when contiguous.
        digest.update(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()[:CHECKSUM_HEX_DIGITS]


def metadata_digest(metadata: dict[str, str]) -> str:
    """Checksum of the metadata strings as stored, the checksums themselves left out."""
    canonical = json.dumps(
        {k: v for k, v in metadata.items() if k != CHECKSUMS_KEY}, sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:CHECKSUM_HEX_DIGITS]


@functools.cache
def _notice_unverifiable() -> None:
    # Once per process: a folder of old bundles would otherwise repeat it for every scene.
    logger.warning(
        "Gaussian bundles written before fit3d-hf recorded checksums load without verification "
        "(lift the scenes again to add them); first one: see the debug log"
    )


def verify_checksums(
    path: Path, metadata: dict, tensors: dict[str, torch.Tensor], all_tensors: bool = False
) -> bool:
    """Compares `tensors` with the stored checksums; False (and a notice) when the bundle has none."""
    checksums = metadata.get(CHECKSUMS_KEY)
    if checksums is None and metadata["format_version"] in CHECKSUMMED_VERSIONS:
        raise CorruptFileError(
            file_problem(
                path,
                f"a version-{metadata['format_version']} bundle without its checksums: the header is damaged",
            )
        )
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
        if metadata_digest(raw) != checksums[METADATA_CHECKSUM]:
            raise CorruptFileError(
                file_problem(path, "its metadata fails its checksum: the header is damaged")
            )
    for name, tensor in tensors.items():
        if name not in checksums:
            raise CorruptFileError(file_problem(path, f"tensor {name!r} has no checksum"))
        if tensor_digest(name, tensor) != checksums[name]:
            raise CorruptFileError(
                file_problem(
                    path, f"tensor {name!r} fails its checksum: the file is damaged; lift the scene again"
                )
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


def check_tensors(path: Path, metadata: dict, tensors: dict[str, torch.Tensor]) -> None:
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
            fail(
                f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape} (N = {n}, F = {f})"
            )
    weight = tensors.get("decoder.weight")
    if weight is not None and (
        weight.ndim != 4 or weight.shape[:2] != (d, f) or weight.shape[2] != weight.shape[3]
    ):
        fail(f"tensor 'decoder.weight' has shape {tuple(weight.shape)}, expected ({d}, {f}, k, k)")
    if SH_KEY in tensors and (
        tensors[SH_KEY].ndim != 3 or tensors[SH_KEY].shape[0] != n or tensors[SH_KEY].shape[2] != 3
    ):
        fail(f"tensor 'sh' has shape {tuple(tensors[SH_KEY].shape)}, expected ({n}, K, 3)")
    if SH_PREFIX + "rest_codes" in tensors:
        _check_compressed_sh(
            path, n, {k[len(SH_PREFIX) :]: v for k, v in tensors.items() if k.startswith(SH_PREFIX)}, fail
        )


def check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
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
        fail(
            f"compressed SH codes have shapes {tuple(sh['dc_codes'].shape)} and {tuple(codes.shape)}, expected ({n}, 3) and ({n},)"
        )
    if sh["dc_offset"].shape != (3,) or sh["dc_step"].shape != (3,):
        fail("compressed SH DC offset and step must have shape (3,)")
    if codebook.ndim != 2 or codebook.shape[0] < 1 or codebook.shape[1] % 3:
        fail(f"tensor 'sh.rest_codebook' has shape {tuple(codebook.shape)}, expected (C, 3 * (K - 1))")
    if n and (int(codes.to(torch.int64).max()) >= codebook.shape[0] or int(codes.to(torch.int64).min()) < 0):
        fail(f"SH codes address rows past the {codebook.shape[0]}-row codebook")
