"""Compression of SH colours for Gaussian bundles: 8-bit DC, vector-quantised higher orders.

The DC term (`[N, 3]`, the view-independent colour) is stored as uint8 with a per-channel affine map
(offset + code * step, step = channel range / 255): image-like 8-bit colour precision, error at most half
a step. The higher orders (`[N, 15, 3]` = 45 values at degree 3) are vector quantised: a k-means codebook
`[C, 45]` in fp16 plus one uint16 code per Gaussian. Code 0 is reserved for the zero vector, so Gaussians
whose higher orders were never trained (degree-0 scenes, or the degree was never raised) round-trip
exactly. 3 + 2 = 5 bytes per Gaussian instead of 96 for fp16 SH.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "MAX_CODEBOOK_SIZE",
    "MIN_CODEBOOK_SIZE",
    "CompressedSH",
    "assemble_sh",
    "decode_sh",
    "default_codebook_size",
    "encode_sh",
    "kmeans",
]

MAX_CODEBOOK_SIZE = 4096
MIN_CODEBOOK_SIZE = 16
GAUSSIANS_PER_CODE = 100
# uint16 codes address at most 65536 rows.
_CODE_LIMIT = 2**16
# Sequential steps of the k-means++ seeding (see `_kmeans_plus_plus`).
_SEEDING_ROUNDS = 256


def _floor_power_of_two(value: int) -> int:
    """The largest power of two <= `value` (>= 1), in integer arithmetic (no float log2 rounding)."""
    return 1 << (value.bit_length() - 1)


def default_codebook_size(num_gaussians: int) -> int:
    """Rows of the higher-order SH codebook for a scene of `num_gaussians` Gaussians, the zero row included.

    The largest power of two <= N / 100, clamped to [16, 4096]: 4096 at 1M Gaussians, 2048 at 229k, 1024
    at 196k. Why it shrinks with N: the codebook (C x 45 fp16, 368,640 B at 4096) is a fixed per-scene
    cost, like the decoder weight, and both must amortise over the scene's Gaussians for the whole file to
    stay within 164 B per Gaussian (161 B per Gaussian + the per-scene part / N; under this rule the
    codebook costs at most 0.9 B per Gaussian from 1600 Gaussians up). The price is view-dependent colour
    detail: on the 300-view synthetic benchmark scene (231k Gaussians, 2048 rows) the held-out PSNR is
    33.2 dB with the k-means codebook alone against 42.5 dB with exact SH; Stage I refines DC and codebook by
    rendering before saving (41.0 dB), and `save_bundle(..., sh_storage="fp16")` keeps the colours exact.

    Tiny scenes keep the rule of before, so that each row stands for about 4 Gaussians or more: at most
    the largest power of two <= N // 4 (8 at 40 Gaussians), and 2 (the zero row plus one learned row)
    below 8 Gaussians.
    """
    if num_gaussians < 8:
        return 2
    floor = min(MIN_CODEBOOK_SIZE, _floor_power_of_two(num_gaussians // 4))
    by_count = (
        _floor_power_of_two(num_gaussians // GAUSSIANS_PER_CODE) if num_gaussians >= GAUSSIANS_PER_CODE else 1
    )
    return min(MAX_CODEBOOK_SIZE, max(floor, by_count))


@dataclass
class CompressedSH:
    """SH coefficients `[N, (degree + 1) ** 2, 3]` in compressed form.

    Attributes:
        dc_codes: `[N, 3]` uint8, the DC term as offset + code * step.
        dc_offset: `[3]` float32, per-channel minimum of the DC term.
        dc_step: `[3]` float32, per-channel quantisation step (range / 255; 1 for a constant channel).
        rest_codebook: `[C, R]` float16, row 0 all zeros; R = 3 * ((degree + 1) ** 2 - 1) (0 at degree 0).
        rest_codes: `[N]` uint16, each Gaussian's codebook row for its higher orders.
    """

    dc_codes: torch.Tensor
    dc_offset: torch.Tensor
    dc_step: torch.Tensor
    rest_codebook: torch.Tensor
    rest_codes: torch.Tensor

    TENSOR_NAMES = ("dc_codes", "dc_offset", "dc_step", "rest_codebook", "rest_codes")

    def __len__(self) -> int:
        return int(self.dc_codes.shape[0])

    @property
    def num_coefficients(self) -> int:
        """K = (degree + 1) ** 2, the number of SH coefficients per colour channel."""
        return 1 + int(self.rest_codebook.shape[1]) // 3

    def decode(self) -> torch.Tensor:
        """`[N, K, 3]` float32 SH coefficients (on the device of the codes)."""
        dc = self.dc_offset.float() + self.dc_codes.float() * self.dc_step.float()
        rest = self.rest_codebook.float()[self.rest_codes.long()]
        return torch.cat([dc[:, None], rest.reshape(len(self), -1, 3)], dim=1)

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors under `prefix + name`, contiguous on the CPU (for safetensors / Arrow)."""
        return {prefix + name: getattr(self, name).detach().cpu().contiguous() for name in self.TENSOR_NAMES}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> CompressedSH:
        missing = [prefix + name for name in cls.TENSOR_NAMES if prefix + name not in tensors]
        if missing:
            raise KeyError(f"compressed SH lacks the tensors {missing}")
        return cls(**{name: tensors[prefix + name] for name in cls.TENSOR_NAMES})

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (getattr(self, name) for name in self.TENSOR_NAMES))


def decode_sh(compressed: CompressedSH) -> torch.Tensor:
    """`[N, K, 3]` float32 SH coefficients of `compressed`."""
    return compressed.decode()


def _nearest(
    x: torch.Tensor,  # [M, R]
    centroids: torch.Tensor,  # [C, R]
    chunk_elements: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid of every row, and its squared distance, in row chunks of about
    `chunk_elements` distances so that memory stays bounded (1M x 4096 distances are 16 GB in fp32)."""
    rows = max(1, chunk_elements // max(len(centroids), 1))
    centroid_norms = (centroids * centroids).sum(dim=1)
    indices = torch.empty(len(x), dtype=torch.long, device=x.device)
    distances = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for start in range(0, len(x), rows):
        chunk = x[start : start + rows]
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, with |x|^2 added after the argmin (it does not change it).
        scores = torch.addmm(centroid_norms[None], chunk, centroids.T, alpha=-2.0)
        best, index = scores.min(dim=1)
        indices[start : start + rows] = index
        distances[start : start + rows] = (best + (chunk * chunk).sum(dim=1)).clamp_min(0.0)
    return indices, distances


def _kmeans_plus_plus(
    x: torch.Tensor,  # [M, R]
    fixed: torch.Tensor,  # [P, R]
    count: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """`count` rows of `x` drawn k-means++ style: each with probability proportional to its squared distance
    to the centroids drawn so far (`fixed` included).

    The draws come in at most `_SEEDING_ROUNDS` rounds, each of `count / _SEEDING_ROUNDS` rows drawn
    independently against the centroids of the earlier rounds (plain k-means++ when `count` <= the rounds).
    One row per step made the 4095-row codebook of a 1M-Gaussian scene 4095 sequential steps of a few small
    launches each, 1.15 s on an H100; the distance weighting, which is what spreads the seeds, is kept, and
    Lloyd's iterations follow. The uniform draws come from the CPU `generator` and the sampling is a
    cumulative sum + binary search on the device: no host round trip per round."""
    uniforms = torch.rand(count, generator=generator, dtype=torch.float64).to(x.device)
    if len(fixed):
        distance = _nearest(x, fixed, 2**26)[1].double()
    else:
        distance = torch.ones(len(x), dtype=torch.float64, device=x.device)
    chosen = torch.empty(count, x.shape[1], dtype=x.dtype, device=x.device)
    norms = (x * x).sum(dim=1)
    per_round = -(-count // _SEEDING_ROUNDS)
    for start in range(0, count, per_round):
        stop = min(start + per_round, count)
        cumulative = torch.cumsum(distance, dim=0)
        index = torch.searchsorted(cumulative, uniforms[start:stop] * cumulative[-1:], right=True).clamp_max(
            len(x) - 1
        )
        chosen[start:stop] = x.index_select(0, index)
        # |x - c|^2 through a matrix product: a row-wise sum over 45 values is far slower on CPUs.
        new = norms[:, None] - 2.0 * (x @ chosen[start:stop].T) + norms.index_select(0, index)[None]
        distance = torch.minimum(distance, new.min(dim=1).values.clamp_min(0.0).double())
    return chosen


@torch.no_grad()
def kmeans(
    x: torch.Tensor,  # [M, R]
    num_clusters: int,
    *,
    iterations: int = 10,
    seed: int = 0,
    fixed: torch.Tensor | None = None,  # [P, R]
    max_fit_points: int | None = None,
    chunk_elements: int = 2**26,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on the device of `x`, deterministic on the CPU for a given seed.

    Hand-written rather than sklearn's `KMeans` because that runs on the CPU only and takes minutes at
    1M x 4096 clusters, while a bundle of that size is written at the end of every Stage I run on the
    GPU; here each iteration is a few chunked matrix products (well under a second per scene on an H100).

    Args:
        x: the rows to cluster.
        num_clusters: C, the number of centroids returned, `fixed` ones included.
        iterations: Lloyd iterations (assign, then move each centroid to the mean of its rows).
        seed: seed of the subsampling and of the k-means++ initialisation (drawn on the CPU, so the
            draws do not depend on the device).
        fixed: P centroids that are never moved (returned first), e.g. the zero vector.
        max_fit_points: fit on a random subset of at most this many rows (default 128 per centroid),
            then assign every row once; k-means++ draws from the first 16 per centroid of them.
        chunk_elements: how many distances to hold at once.

    Returns:
        centroids `[C, R]` (float32) and the index `[M]` of each row's nearest centroid.
    """
    x = x.float()
    fixed = x.new_zeros(0, x.shape[1]) if fixed is None else fixed.to(x)
    learned = num_clusters - len(fixed)
    if learned < 0 or len(x) == 0:
        raise ValueError(
            f"kmeans needs rows and num_clusters >= {len(fixed)} fixed centroids, got {len(x)} rows, {num_clusters}"
        )
    if learned >= len(x):  # every row gets its own centroid: nothing to fit
        centroids = torch.cat([fixed, x, x.new_zeros(learned - len(x), x.shape[1])])
        return centroids, len(fixed) + torch.arange(len(x), device=x.device)
    generator = torch.Generator().manual_seed(seed)
    max_fit_points = max(max_fit_points or 128 * num_clusters, learned)
    fit = x[torch.randperm(len(x), generator=generator)[:max_fit_points].to(x.device)]
    pool = fit[: max(16 * num_clusters, learned)]
    centroids = torch.cat([fixed, _kmeans_plus_plus(pool, fixed, learned, generator)])
    for _ in range(iterations):
        index, distance = _nearest(fit, centroids, chunk_elements)
        sums = torch.zeros_like(centroids).index_add_(0, index, fit)
        # (not bincount: it has no deterministic CUDA kernel, so it raises under deterministic algorithms)
        counts = torch.zeros(len(centroids), dtype=fit.dtype, device=fit.device)
        counts.index_add_(0, index, torch.ones_like(distance))
        moved = sums / counts.clamp_min(1.0)[:, None]
        # Empty clusters restart at the rows worst served by the current centroids.
        empty = torch.nonzero(counts[len(fixed) :] == 0).flatten() + len(fixed)
        if len(empty):
            worst = torch.topk(distance, min(len(empty), len(fit))).indices
            moved[empty[: len(worst)]] = fit[worst]
        moved[: len(fixed)] = fixed
        centroids = moved
    index, _ = _nearest(x, centroids, chunk_elements)
    return centroids, index


@torch.no_grad()
def encode_sh(
    sh: torch.Tensor,  # [N, K, 3]
    *,
    codebook_size: int | None = None,
    iterations: int = 10,
    seed: int = 0,
) -> CompressedSH:
    """Compresses SH coefficients (see the module docstring); computed on the device of `sh`, returned
    on the CPU.

    Args:
        sh: `[N, K, 3]` coefficients, DC first.
        codebook_size: rows of the higher-order codebook, the reserved zero row included
            (default `default_codebook_size(N)`); at most 65536 (uint16 codes).
        iterations: k-means iterations.
        seed: k-means seed (same input and seed -> same output on the CPU).
    """
    if sh.ndim != 3 or sh.shape[2] != 3 or sh.shape[1] < 1:
        raise ValueError(f"sh must have shape (N, K, 3), got {tuple(sh.shape)}")
    if not torch.isfinite(sh).all():
        raise ValueError(
            "sh holds non-finite values (NaN or inf): the Gaussians diverged; check the training losses"
        )
    n = sh.shape[0]
    codebook_size = default_codebook_size(n) if codebook_size is None else codebook_size
    if not 2 <= codebook_size <= _CODE_LIMIT:
        raise ValueError(
            f"codebook_size must be in [2, {_CODE_LIMIT}] (zero row + uint16 codes), got {codebook_size}"
        )
    sh = sh.detach().float()

    # Higher orders: code 0 is the zero vector; k-means fits the other rows to the non-zero vectors.
    rest = sh[:, 1:].reshape(n, -1)
    codes = torch.zeros(n, dtype=torch.long, device=sh.device)
    nonzero = torch.nonzero((rest != 0).any(dim=1)).flatten() if rest.shape[1] else codes[:0]
    if len(nonzero):
        zero = rest.new_zeros(1, rest.shape[1])
        size = min(codebook_size, len(nonzero) + 1)
        centroids, index = kmeans(rest[nonzero], size, iterations=iterations, seed=seed, fixed=zero)
        codes[nonzero] = index
        codebook = centroids.half()
    else:
        codebook = rest.new_zeros(1, rest.shape[1], dtype=torch.float16)
    return assemble_sh(sh[:, 0], codebook, codes)


@torch.no_grad()
def assemble_sh(
    dc: torch.Tensor,  # [N, 3]
    rest_codebook: torch.Tensor,  # [C, R], row 0 zero
    rest_codes: torch.Tensor,  # [N]
) -> CompressedSH:
    """Compressed SH from a codebook and codes already chosen, quantising only the DC term: what
    `encode_sh` returns after its k-means, and what Stage I stores after refining the DC and the codebook
    by rendering (the codes fixed)."""
    # DC: per-channel affine uint8. Codes are computed in float64 against the float32 offset and step
    # that are stored, so the decoded value is within half a step of the input.
    dc = dc.detach().double()
    n = len(dc)
    low = (dc.amin(dim=0) if n else dc.new_zeros(3)).float()
    high = (dc.amax(dim=0) if n else dc.new_zeros(3)).float()
    step = ((high.double() - low.double()) / 255.0).float()
    step = torch.where(step > 0, step, torch.ones_like(step))  # a constant channel: every code is 0
    dc_codes = torch.round((dc - low.double()) / step.double()).clamp(0, 255).to(torch.uint8)
    # uint16 is a "shell" dtype in torch (few kernels, fewer on CUDA): convert on the CPU.
    return CompressedSH(
        dc_codes=dc_codes.cpu(),
        dc_offset=low.cpu(),
        dc_step=step.cpu(),
        rest_codebook=rest_codebook.detach().half().cpu(),
        rest_codes=rest_codes.cpu().to(torch.int32).to(torch.uint16),
    )
