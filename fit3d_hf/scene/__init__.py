"""Scenes: cameras, the frame/scene data model, readers of every supported layout, and writers.

The `synthetic` (generated test scenes) and `preprocess_scannetpp` modules of this package are imported
on demand (`from fit3d_hf.scene import synthetic`), not here, to keep `import fit3d_hf.scene` light.
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
from fit3d_hf.scene.scene import Frame, Scene, load_depth, load_image, load_labels, load_mask
from fit3d_hf.scene.writers import write_colmap_text, write_nerfstudio_transforms, write_ply_points

__all__ = [
    "LAYOUTS",
    "SCANNETPP_SPLITS",
    "UNDISTORTED_DIRNAME",
    "Camera",
    "Frame",
    "Scene",
    "colmap_to_scannetpp_nerfstudio",
    "detect_layout",
    "intrinsics_matrix",
    "load_depth",
    "load_image",
    "load_labels",
    "load_mask",
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
    "rotmat_to_qvec",
    "scannetpp_nerfstudio_to_colmap",
    "write_colmap_text",
    "write_nerfstudio_transforms",
    "write_ply_points",
]
