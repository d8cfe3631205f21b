"""Differentiable rendering of RGB, depth, alpha and feature maps from 3D Gaussians.

`render()` is the API; it runs a compiled extension (`rasterizer_cuda/`, built by setup.py or compiled on
first use) for float32 tensors, the CUDA one on CUDA devices and the CPU one on the CPU, and the pure-PyTorch
reference (`_reference.py`, the oracle of the compiled ops) elsewhere. `spec.py` states the compositing pixel
by pixel. `feature_l1()` is Stage I's feature loss, a fused op of the same extensions. Importing this package
compiles nothing.
"""

from fit3d_hf.render.feature_loss import feature_l1
from fit3d_hf.render.rasterize import RenderOutput, backend, render

__all__ = ["RenderOutput", "backend", "feature_l1", "render"]
