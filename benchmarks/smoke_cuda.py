"""A first look at a fresh GPU machine: the extension loads, renders a small scene forward and backward, and a
bad argument reaches Python as a ValueError from the C++ checks (run with python -X faulthandler)."""

import sys

import torch

from fit3d_hf.render import render
from fit3d_hf.render._backend import extension_error, load_extension


def main() -> int:
    ext = load_extension()
    print("extension:", ext is not None, extension_error(), flush=True)  # noqa: T201
    g = torch.Generator().manual_seed(0)
    n = 1000
    means = (torch.rand(n, 3, generator=g) - 0.5) * 2 + torch.tensor([0.0, 0.0, 4.0])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.05 + 0.01
    opacities = torch.rand(n, generator=g)
    colors, features = torch.rand(n, 3, generator=g), torch.randn(n, 16, generator=g)
    K = torch.tensor([[[60.0, 0, 32], [0, 60.0, 24], [0, 0, 1]]])
    w2c = torch.eye(4)[None]
    params = [t.cuda().requires_grad_(True) for t in (means, quats, scales, opacities, colors, features)]
    out = render(*params, K.cuda(), w2c.cuda(), 64, 48, backend="cuda")
    (out.rgb.sum() + out.features.sum()).backward()
    print("render ok:", float(out.alpha.mean()), [float(p.grad.abs().sum()) for p in params], flush=True)  # noqa: T201
    try:
        ext.project_fwd(params[0].detach(), params[1].detach()[:10].contiguous(), params[2].detach(),
                        params[3].detach(), w2c.cuda(), K.cuda(), 64, 48, 0.01, 1e10)  # fmt: skip
    except ValueError as error:
        print("C++ check reached Python:", str(error).splitlines()[0], flush=True)  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
