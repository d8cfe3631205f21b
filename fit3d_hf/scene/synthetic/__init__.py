"""A procedurally textured synthetic room, ray-cast analytically, written as ScanNet++ scenes.

The generator stands in for ScanNet++ wherever real data is not available (tests, CI, `fit3d demo`):
it writes the same files FiT3D's preprocessing produces (`generate_scene`), or the raw ScanNet++ DSLR
layout with fisheye images that `fit3d preprocess-scannetpp` consumes (`generate_raw_scene`), plus
ground truth (depth, semantic labels, analytic surface normals) the real preprocessed data does not carry.

No renderer library is involved: a room is an axis-aligned box seen from inside plus a few boxes and
spheres, so each ray's first hit has a closed form and a whole image is a handful of vectorised numpy
expressions. Shading is Lambertian under one point light and therefore view-independent, which makes the
sparse points' colours equal to the rendered colours wherever they are seen.

Frames: geometry lives in a "room frame" (x along the room's width, y along its depth, z up, the room
spanning [0, size]); `SyntheticRoom.room_to_world` places it in the world (COLMAP) frame in which the
cameras and `points3D.txt` are expressed -- a random rigid transform by default, so that nothing
downstream can silently rely on an axis-aligned, z-up world.

The package, one job per module, each importing only those above it in this list:

- `config`: `SyntheticSceneConfig` and the scene / image ids;
- `textures`: the procedural albedo textures;
- `cameras`: the raw fisheye lens, the camera path, the pinhole cameras, the pixel sample grid;
- `shapes`: the room, its boxes and spheres, their labels, ray hits, analytic normals, surface samples;
- `spec`: `make_scene_spec`, the seeded description of a room, and its anonymised regions;
- `raycast`: shading and ray casting of views (`render_view`, `render_fisheye_view`, `render_rays`);
- `points`: the sparse points (`sample_points`);
- `writers`: the two layout writers and `generate_dataset`.
"""

from fit3d_hf.scene.synthetic.cameras import FisheyeIntrinsics
from fit3d_hf.scene.synthetic.config import SyntheticSceneConfig, image_ids, scene_id_for_seed
from fit3d_hf.scene.synthetic.points import SparsePoints, sample_points
from fit3d_hf.scene.synthetic.raycast import render_fisheye_view, render_rays, render_view
from fit3d_hf.scene.synthetic.shapes import (
    NO_HIT_LABEL,
    SEMANTIC_CLASSES,
    SyntheticBox,
    SyntheticRoom,
    SyntheticSphere,
)
from fit3d_hf.scene.synthetic.spec import anonymised_mask, make_scene_spec
from fit3d_hf.scene.synthetic.textures import ProceduralTexture
from fit3d_hf.scene.synthetic.writers import generate_dataset, generate_raw_scene, generate_scene

__all__ = [
    "NO_HIT_LABEL",
    "SEMANTIC_CLASSES",
    "FisheyeIntrinsics",
    "ProceduralTexture",
    "SparsePoints",
    "SyntheticBox",
    "SyntheticRoom",
    "SyntheticSceneConfig",
    "SyntheticSphere",
    "anonymised_mask",
    "generate_dataset",
    "generate_raw_scene",
    "generate_scene",
    "image_ids",
    "make_scene_spec",
    "render_fisheye_view",
    "render_rays",
    "render_view",
    "sample_points",
    "scene_id_for_seed",
]
