"""Dataset column mapping: which columns of a probe data set hold the image, the class ids, the depth, the
normals, the validity mask and the cameras, and which of them each probe task reads."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TASKS", "ColumnMapping"]

TASKS = ("segmentation", "depth", "correspondence", "normals")


@dataclass
class ColumnMapping:
    """Which dataset columns hold what (None: the column is not used).

    Args:
        image: RGB image column (a datasets `Image`, an array or nested lists, `[H, W, 3]`).
        label: class-id map column (an `L`/`P` mode image or an integer array, `[H, W]`).
        depth: depth map column (a 16-bit or float image, or an array); values / `depth_scale` = metres.
        normals: surface-normal column (an 8-bit RGB image `(n + 1) / 2 * 255` or a float array `[H, W, 3]`).
        mask: optional validity mask column (non-zero = valid); masked-out pixels get no ground truth.
        scene: scene id column (correspondence probe: views are paired within a scene).
        intrinsics: `[3, 3]` pinhole intrinsics column (pixel centres at half-integers).
        pose: `[4, 4]` world-to-camera column, OpenCV axes (x right, y down, z forward).
    """

    image: str = "image"
    label: str | None = "label"
    depth: str | None = "depth"
    mask: str | None = None
    scene: str | None = "scene_id"
    intrinsics: str | None = "K"
    pose: str | None = "world_to_camera"
    normals: str | None = "normals"

    def required(self, task: str) -> list[str]:
        """The columns a task reads."""
        if task == "segmentation":
            columns = [self.image, self.label]
        elif task == "depth":
            columns = [self.image, self.depth]
        elif task == "correspondence":
            columns = [self.image, self.depth, self.scene, self.intrinsics, self.pose]
        elif task == "normals":
            columns = [self.image, self.normals]
        else:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if any(column is None for column in columns):
            raise ValueError(f"the {task} probe needs these columns set, got {columns}")
        return columns + ([self.mask] if self.mask else [])
