"""Error bounds derived from a floating-point format's precision, for comparing a low-precision run with fp32."""

import torch

# bfloat16 keeps 8 significant bits: unit roundoff u = 2^-8; rounding a value changes it by at most u/2 relative.
BF16_UNIT_ROUNDOFF = 2.0**-8


def assert_within_bf16_precision(low: torch.Tensor, reference: torch.Tensor, num_layers: int) -> None:
    """`low` (a bf16-autocast run) against `reference` (the same inputs in fp32) for a ViT of `num_layers` layers.

    Under autocast every matmul rounds its inputs to bf16: the patch embedding, then per layer the qkv and output
    projections of attention and the two MLP matmuls, 1 + 4L rounding stages in series, each adding at most u/2 of
    relative error. Their sum bounds the relative error of the features (Frobenius norm; measured: about 0.7 u for
    2 layers), and twice that bounds the largest single error relative to the largest feature (measured: about u).
    The error must also be there at all: an autocast that silently ran in fp32 (as fp16 on the CPU does) fails.
    """
    stages = 1 + 4 * num_layers
    low, reference = low.float(), reference.float()
    assert torch.isfinite(low).all()
    relative = float((low - reference).norm() / reference.norm())
    largest = float((low - reference).abs().max() / reference.abs().max())
    bound = stages * BF16_UNIT_ROUNDOFF / 2
    assert relative <= bound, (
        f"relative error {relative:.2e} above the bf16 bound {bound:.2e} ({stages} rounding stages)"
    )
    assert largest <= 2 * bound, (
        f"largest error {largest:.2e} (relative to the largest feature) above {2 * bound:.2e}"
    )
    assert relative > BF16_UNIT_ROUNDOFF / 16, f"relative error {relative:.2e}: the run was not in bf16"
