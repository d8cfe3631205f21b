"""SH compression of bundles: 8-bit DC within half a step, k-means codebook for the higher orders."""

import pytest
import torch

from fit3d_hf.gaussians.sh_codec import CompressedSH, default_codebook_size, encode_sh, kmeans


def _clustered_sh(n=4000, prototypes=64, noise=0.002, zero_fraction=0.25, seed=0):
    """SH whose higher orders are prototypes + small noise, a quarter of them exactly zero (never trained)."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.05 * torch.randn(prototypes, 45, generator=g)
    rest = centres[torch.randint(0, prototypes, (n,), generator=g)] + noise * torch.randn(n, 45, generator=g)
    rest[: int(n * zero_fraction)] = 0
    dc = 2.0 * torch.randn(n, 1, 3, generator=g)
    dc[0, 0, 0] = 9.0  # an outlier stretching the red range
    return torch.cat([dc, rest.reshape(n, 15, 3)], dim=1)


def test_dc_is_uint8_within_half_a_step():
    sh = _clustered_sh()
    sh[:, 0, 2] = 0.7  # a constant channel round-trips exactly
    compressed = encode_sh(sh)
    assert compressed.dc_codes.dtype == torch.uint8 and compressed.dc_codes.shape == (4000, 3)
    decoded = compressed.decode()
    error = (decoded[:, 0] - sh[:, 0]).abs().amax(dim=0)
    step = compressed.dc_step
    expected_step = (sh[:, 0].amax(dim=0) - sh[:, 0].amin(dim=0)) / 255
    torch.testing.assert_close(step[:2], expected_step[:2])
    assert (error[:2] <= step[:2] / 2 + 1e-6).all(), (error, step)
    assert error[2] < 1e-7
    assert int(compressed.dc_codes[:, 0].min()) == 0 and int(compressed.dc_codes[:, 0].max()) == 255


def test_default_codebook_size_amortises_over_the_scene():
    """The largest power of two <= N / 100 in [16, 4096]; tiny scenes keep about 4 Gaussians per row."""
    sizes = {
        n: default_codebook_size(n)
        for n in (1, 7, 8, 40, 64, 400, 3199, 3200, 4000, 102_400, 196_000, 204_799)
    }
    assert sizes == {
        1: 2, 7: 2, 8: 2, 40: 8, 64: 16, 400: 16, 3199: 16, 3200: 32, 4000: 32, 102_400: 1024, 196_000: 1024, 204_799: 1024,
    }  # fmt: skip
    sizes = {n: default_codebook_size(n) for n in (204_800, 229_439, 409_599, 409_600, 1_000_000, 10**9)}
    assert sizes == {204_800: 2048, 229_439: 2048, 409_599: 2048, 409_600: 4096, 1_000_000: 4096, 10**9: 4096}
    # At most 0.9 B of fp16 codebook (45 values) per Gaussian from 1600 Gaussians up.
    assert all(default_codebook_size(n) * 90 <= 0.9 * n for n in range(1600, 500_000, 997))


def test_rest_codebook_on_clustered_sh_and_zero_rows_exact():
    sh = _clustered_sh()
    compressed = encode_sh(
        sh, codebook_size=512
    )  # the default at 4000 Gaussians is 32, fewer than the 64 clusters
    assert compressed.rest_codebook.shape == (512, 45)
    assert compressed.rest_codebook.dtype == torch.float16 and compressed.rest_codes.dtype == torch.uint16
    assert (compressed.rest_codebook[0] == 0).all()  # the reserved zero row
    decoded = compressed.decode()
    assert decoded.shape == (4000, 16, 3) and decoded.dtype == torch.float32
    assert torch.equal(decoded[:1000, 1:], torch.zeros(1000, 15, 3))  # untrained higher orders: exact
    error = decoded[1000:, 1:] - sh[1000:, 1:]
    rms_signal = float(sh[1000:, 1:].pow(2).mean().sqrt())
    rms_error = float(error.pow(2).mean().sqrt())
    # 64 clusters of noise 0.002 and 511 codes: the error is below the noise, ~3% of the signal.
    assert rms_error < 0.002 and rms_error < 0.05 * rms_signal, (rms_error, rms_signal)
    assert float(error.abs().max()) < 0.02


def test_degree_zero_and_all_zero_rest():
    dc_only = torch.randn(100, 1, 3)
    compressed = encode_sh(dc_only)
    assert compressed.rest_codebook.shape == (1, 0) and compressed.num_coefficients == 1
    assert compressed.decode().shape == (100, 1, 3)
    never_raised = torch.cat([torch.randn(100, 1, 3), torch.zeros(100, 15, 3)], dim=1)
    compressed = encode_sh(never_raised)
    assert compressed.rest_codebook.shape == (1, 45) and (compressed.rest_codes == 0).all()
    assert torch.equal(compressed.decode()[:, 1:], never_raised[:, 1:])


def test_encoding_is_deterministic_and_tensors_round_trip():
    sh = _clustered_sh(n=2000, seed=3)
    first, second = encode_sh(sh), encode_sh(sh.clone())
    for name in CompressedSH.TENSOR_NAMES:
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    restored = CompressedSH.from_tensors(first.tensors("sh."), "sh.")
    assert torch.equal(restored.decode(), first.decode())
    # 5 bytes per Gaussian + codebook (16 rows by default at 2000 Gaussians) + affine.
    assert first.num_bytes == 2000 * 5 + 16 * 45 * 2 + 24
    with pytest.raises(KeyError, match="sh.rest_codes"):
        CompressedSH.from_tensors(
            {k: v for k, v in first.tensors("sh.").items() if k != "sh.rest_codes"}, "sh."
        )


def test_encode_refuses_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        encode_sh(torch.full((10, 16, 3), float("nan")))
    with pytest.raises(ValueError, match=r"shape \(N, K, 3\)"):
        encode_sh(torch.zeros(10, 16))
    with pytest.raises(ValueError, match="codebook_size"):
        encode_sh(torch.zeros(10, 16, 3), codebook_size=70_000)


def test_kmeans_finds_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centres = 10 * torch.randn(8, 5, generator=g)
    x = centres[torch.arange(800) % 8] + 0.01 * torch.randn(800, 5, generator=g)
    found, index = kmeans(x, 8, seed=0, chunk_elements=800)  # 100-row chunks: exercises the chunking
    assert float(torch.cdist(found, centres).min(dim=1).values.max()) < 0.01
    assert torch.equal(index, torch.cdist(x, found).argmin(dim=1))
    # A fixed centroid stays put and comes first.
    found, _ = kmeans(x, 9, seed=0, fixed=torch.zeros(1, 5))
    assert torch.equal(found[0], torch.zeros(5))


def test_seeding_in_rounds_keeps_the_distance_weighting(monkeypatch):
    """64 far-apart blobs, 64 seeds drawn in 16 rounds of 4: each round draws against the seeds of the
    earlier ones, so the seeds cover the blobs far better than uniform draws do (those leave about a third
    of the blobs without a seed)."""
    from fit3d_hf.gaussians import sh_codec

    g = torch.Generator().manual_seed(0)
    centres = 10 * torch.randn(64, 5, generator=g)
    x = centres[torch.arange(6400) % 64] + 0.01 * torch.randn(6400, 5, generator=g)

    def inertia(seeds):
        return float(torch.cdist(x, seeds).min(dim=1).values.pow(2).mean())

    monkeypatch.setattr(sh_codec, "_SEEDING_ROUNDS", 16)
    in_rounds = [
        inertia(sh_codec._kmeans_plus_plus(x, x[:0], 64, torch.Generator().manual_seed(s))) for s in range(5)
    ]
    uniform = [
        inertia(x[torch.randperm(6400, generator=torch.Generator().manual_seed(s))[:64]]) for s in range(5)
    ]
    assert max(in_rounds) < 0.25 * min(uniform)
    # One round is a uniform draw (no seed to weigh against yet), so its cover is as poor.
    monkeypatch.setattr(sh_codec, "_SEEDING_ROUNDS", 1)
    one_round = [
        inertia(sh_codec._kmeans_plus_plus(x, x[:0], 64, torch.Generator().manual_seed(s))) for s in range(5)
    ]
    assert min(one_round) > 4 * max(in_rounds)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_encoding_of_a_million_gaussians_is_fast_and_matches_the_cpu():
    import time

    g = torch.Generator().manual_seed(0)
    n = 1_000_000
    sh = torch.cat([torch.randn(n, 1, 3, generator=g), 0.011 * torch.randn(n, 15, 3, generator=g)], dim=1)
    on_gpu = sh.cuda()
    encode_sh(on_gpu[:10_000])  # CUDA start-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    compressed = encode_sh(on_gpu)
    seconds = time.perf_counter() - start
    print(f"encode_sh of 1M Gaussians, 4096 codes, on {torch.cuda.get_device_name()}: {seconds:.2f} s")  # noqa: T201
    assert seconds < 3.0
    assert compressed.rest_codebook.shape == (4096, 45) and compressed.dc_codes.device.type == "cpu"
    assert torch.equal(compressed.dc_codes, encode_sh(sh[:, :1]).dc_codes)  # the DC is exact arithmetic
    error = compressed.decode()[:, 1:] - sh[:, 1:]
    assert float(error.pow(2).mean().sqrt()) < 0.011  # below the signal: the codebook captures some of it
