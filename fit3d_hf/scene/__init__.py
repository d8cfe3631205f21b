"""Scenes: cameras, the frame/scene data model, readers of every supported layout, scene specs (how every stage
names its scenes), the undistortion cache, and writers.

The readers live one format a module (`scannetpp_layout`, `transforms_json`, `colmap_text`, `ply`, over
`readers_common`); `readers` detects the layout and dispatches. The `synthetic` package and `synthetic_captures`
(generated test scenes and own-capture-style scenes), `preprocess_scannetpp` (with its OpenCV image steps in
`preprocess_images`) and `convert` (`fit3d convert-scene`) are imported on demand
(`from fit3d_hf.scene import synthetic`), not here, to keep `import fit3d_hf.scene` light.
"""

from fit3d_hf.scene.camera import (
    Camera,
    colmap_to_scannetpp_nerfstudio,
    intrinsics_matrix,
    opencv_to_opengl_camera_to_world,
    opengl_camera_to_world_to_opencv,
    qvec_to_rotmat,
    rotmat_to_qvec,
    scannetpp_nerfstudio_to_colmap,
)
from fit3d_hf.scene.readers import (
    LAYOUTS,
    SCANNETPP_SPLITS,
    UNDISTORTED_DIRNAME,
    detect_layout,
    read_colmap_points,
    read_colmap_scene,
    read_nerfstudio_scene,
    read_ply_points,
    read_scannetpp_scene,
    read_scannetpp_split,
    read_scene,
)
from fit3d_hf.scene.scene import (
    Frame,
    Scene,
    decode_normals,
    encode_normals,
    load_depth,
    load_image,
    load_image_pixels,
    load_labels,
    load_mask,
    load_normals,
)
from fit3d_hf.scene.specs import heldout_view_indices, is_scene, resolve_scene_list, split_views
from fit3d_hf.scene.undistort import UNDISTORT_CACHE_ENV, undistort_cache_dir
from fit3d_hf.scene.writers import write_colmap_text, write_nerfstudio_transforms, write_ply_points

__all__ = [
    "LAYOUTS",
    "SCANNETPP_SPLITS",
    "UNDISTORTED_DIRNAME",
    "UNDISTORT_CACHE_ENV",
    "Camera",
    "Frame",
    "Scene",
    "colmap_to_scannetpp_nerfstudio",
    "decode_normals",
    "detect_layout",
    "encode_normals",
    "heldout_view_indices",
    "intrinsics_matrix",
    "is_scene",
    "load_depth",
    "load_image",
    "load_image_pixels",
    "load_labels",
    "load_mask",
    "load_normals",
    "opencv_to_opengl_camera_to_world",
    "opengl_camera_to_world_to_opencv",
    "qvec_to_rotmat",
    "read_colmap_points",
    "read_colmap_scene",
    "read_nerfstudio_scene",
    "read_ply_points",
    "read_scannetpp_scene",
    "read_scannetpp_split",
    "read_scene",
    "resolve_scene_list",
    "rotmat_to_qvec",
    "scannetpp_nerfstudio_to_colmap",
    "split_views",
    "undistort_cache_dir",
    "write_colmap_text",
    "write_nerfstudio_transforms",
    "write_ply_points",
]
