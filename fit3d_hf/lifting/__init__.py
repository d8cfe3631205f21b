"""Stage I: lift a backbone's 2D features of one scene into 3D feature Gaussians.

The method of FiT3D (ECCV 2024, §3.1), with its hyper-parameters as defaults: 3DGS fitted to the scene's
images, each Gaussian also carrying an F-dim feature (F = 64) that is alpha-blended into a feature map and
decoded by a per-scene 3x3 convolution (F -> D, no bias) at full resolution. Loss:
`0.8 * L1(rgb) + 0.2 * (1 - SSIM(rgb)) + 1.0 * L1(decoded features, upsampled backbone features)`; the
rasterizer routes the feature loss to the features only, never to geometry. Anonymised pixels (mask 0)
are excluded by replacing the targets there with the detached prediction, as the original does.

Unlike the original, the backbone's target features are computed once per image and kept (fp16, at patch
resolution) instead of being recomputed every iteration, and a run checkpoints itself so that a killed run
resumes where it stopped and ends with the same Gaussians. The bundle stores the SH colours compressed (see
`fit3d_hf.gaussians.sh_codec`); their DC terms and codebook are refined by rendering before they are saved.

The package, one step per module: `arguments` (the options and the settings that determine a result),
`scene_data` (a scene's views and target features on the device), `lifter` (the optimisation of one scene),
`results` (the bundle, metrics and previews a scene leaves) and `runner` (`lift_scene`, `lift_many`).
"""

from ..scene.specs import resolve_scene_list
from .arguments import NON_RESULT_FIELDS, LiftingArguments, lifting_settings
from .runner import lift_many, lift_scene
from .scene_data import SceneData, load_scene_data, scene_extent

__all__ = [
    "LiftingArguments",
    "NON_RESULT_FIELDS",
    "SceneData",
    "lift_many",
    "lift_scene",
    "lifting_settings",
    "load_scene_data",
    "resolve_scene_list",
    "scene_extent",
]
