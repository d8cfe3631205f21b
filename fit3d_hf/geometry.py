"""The maths of a 3D Gaussian, shared by the renderer and the Gaussian model: quaternions to rotations, the
covariance of a scale and a rotation, and the real spherical-harmonic basis with its constants.

A leaf: it imports only torch. `fit3d_hf/render/` (projection, SH colours) and `fit3d_hf/gaussians/`
(initialisation, densification) both read their rotation and SH conventions from here, so the two cannot
drift; the C++ twins of these functions are in `rasterizer_cuda/common.h`.

Conventions: quaternions are (w, x, y, z) and need not be normalised; SH coefficients are ordered as in
3DGS and gsplat (degree by degree, DC first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SH_C0",
    "SH_C1",
    "SH_C2",
    "SH_C3",
    "covariance_from_scale_rotation",
    "quat_to_rotmat",
    "sh_basis",
]

# Real spherical-harmonic basis constants, in the order used by 3DGS and gsplat.
# Degree 0: Y_0^0 = 1 / (2 sqrt(pi)) (also in rasterizer_cuda/constants.h, checked by the tests).
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (
    1.0925484305920792,
    -1.0925484305920792,
    0.31539156525252005,
    -1.0925484305920792,
    0.5462742152960396,
)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices of quaternions.

    Args:
        quats: `[..., 4]` quaternions (w, x, y, z), any non-zero norm.

    Returns:
        `[..., 3, 3]` rotation matrices of the normalised quaternions.
    """
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = (
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    )
    return torch.stack(rows, -2)


def covariance_from_scale_rotation(quats: Tensor, scales: Tensor) -> Tensor:
    """3D covariances `R(q) diag(s)^2 R(q)^T` of Gaussians.

    Args:
        quats: `[N, 4]` rotations (w, x, y, z), any non-zero norm.
        scales: `[N, 3]` standard deviations along the rotated axes.

    Returns:
        `[N, 3, 3]` covariances (world frame).
    """
    m = quat_to_rotmat(quats) * scales[:, None, :]  # [N, 3, 3] = R(q) diag(s)
    return m @ m.transpose(-1, -2)


def sh_basis(dirs: Tensor, degree: int) -> Tensor:
    """Real spherical-harmonic basis up to `degree` (0-3), evaluated at unit directions.

    Args:
        dirs: `[..., 3]` unit vectors.
        degree: highest degree.

    Returns:
        `[..., (degree + 1) ** 2]` basis values.
    """
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            SH_C2[0] * x * y,
            SH_C2[1] * y * z,
            SH_C2[2] * (2 * zz - xx - yy),
            SH_C2[3] * x * z,
            SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            SH_C3[0] * y * (3 * xx - yy),
            SH_C3[1] * x * y * z,
            SH_C3[2] * y * (4 * zz - xx - yy),
            SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            SH_C3[4] * x * (4 * zz - xx - yy),
            SH_C3[5] * z * (xx - yy),
            SH_C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(out, -1)
