"""Options of a synthetic scene (`SyntheticSceneConfig`) and the names of what it generates: scene ids
and image ids."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SyntheticSceneConfig", "image_ids", "scene_id_for_seed"]


@dataclass
class SyntheticSceneConfig:
    """Options of one synthetic scene; the same config and seed always give the same files.

    Args:
        seed: seeds the room layout, textures, camera path and sparse points.
        num_views: number of camera views along the path.
        width: width of the *preprocessed* (pinhole) images in pixels.
        height: height of the preprocessed images in pixels.
        num_points: number of sparse points in `points3D.txt` (fewer if the room cannot supply enough
            points seen by at least two views).
        fov_degrees: horizontal field of view of the preprocessed pinhole camera; the raw fisheye camera
            is built to cover about the same angle.
        room_width: room extent along the room frame's x axis, in metres.
        room_depth: room extent along y, in metres.
        room_height: room extent along z (up), in metres.
        num_boxes: boxes standing on the floor (some rotated about the vertical axis).
        num_spheres: spheres resting on the floor or floating.
        test_every: every `test_every`-th view (indices test_every-1, 2*test_every-1, ...) goes to
            `test_frames`; 0 puts every view into `frames`.
        anonymised_every: every `anonymised_every`-th view (indices 2, 2+n, ...) gets an anonymised
            rectangle (grey in the image, 0 in the mask); 0 disables them.
        supersample: rays per pixel side for the RGB of the preprocessed images (depth and labels are
            always taken at the pixel centre).
        raw_scale: the raw images are `raw_scale` times the preprocessed size (ScanNet++ downscales x2).
        raw_supersample: rays per pixel side for the raw fisheye images, so that downscaling them is clean.
        fisheye_k1: OPENCV_FISHEYE (equidistant) distortion coefficient k1 of the raw camera.
        fisheye_k2: coefficient k2.
        fisheye_k3: coefficient k3.
        fisheye_k4: coefficient k4.
        jpeg_quality: JPEG quality of the written images.
        random_world_frame: place the room in the world (COLMAP) frame with a random rigid transform;
            if False the world frame is the room frame (z up, room in [0, size]).
    """

    seed: int = 0
    num_views: int = 24
    width: int = 160
    height: int = 120
    num_points: int = 4000
    fov_degrees: float = 70.0
    room_width: float = 6.0
    room_depth: float = 4.0
    room_height: float = 3.0
    num_boxes: int = 4
    num_spheres: int = 3
    test_every: int = 8
    anonymised_every: int = 5
    supersample: int = 1
    raw_scale: int = 2
    raw_supersample: int = 2
    fisheye_k1: float = 0.05
    fisheye_k2: float = -0.01
    fisheye_k3: float = 0.004
    fisheye_k4: float = -0.001
    jpeg_quality: int = 95
    random_world_frame: bool = True

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("num_views", "width", "height", "supersample", "raw_scale", "raw_supersample"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 10.0 <= self.fov_degrees <= 120.0:
            raise ValueError(f"fov_degrees must lie in [10, 120], got {self.fov_degrees}")
        if min(self.room_width, self.room_depth) < 2.5 or self.room_height < 2.0:
            raise ValueError(
                "the room must be at least 2.5 m wide and deep and 2 m high, got "
                f"{self.room_width} x {self.room_depth} x {self.room_height}"
            )
        if self.num_points < 0 or self.num_boxes < 0 or self.num_spheres < 0:
            raise ValueError("num_points, num_boxes and num_spheres must be >= 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")


def scene_id_for_seed(seed: int) -> str:
    """Scene id of the generated scene with `seed`: ten characters without "_" like ScanNet++'s ids."""
    return f"synth{seed:05d}"


def image_ids(num_views: int) -> list[str]:
    """ScanNet++-style DSLR image names (without extension) of `num_views` views."""
    return [f"DSC{index:05d}" for index in range(num_views)]
