"""A scene's views as Stage I optimises them: images, masks and cameras on the device, with the backbone's
target features computed once per image (`load_scene_data`), and the scene's extent."""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..utils import map_ahead

__all__ = ["SceneData", "load_scene_data", "scene_extent"]

logger = logging.getLogger(__name__)

# threads reading views ahead of the backbone (decoding a 1752x1168 JPEG and resizing it takes ~25 ms)
_READ_THREADS = min(8, os.cpu_count() or 1)
# views per backbone call, by device type: on CUDA, one view at a time leaves a small backbone waiting on its
# kernel launches; on the CPU, batching gains nothing and costs memory (1)
_TARGET_BATCH = {"cuda": 8}


@dataclass
class SceneData:
    """A scene's views on the device: images uint8 `[V, 3, H, W]`, masks bool `[V, 1, H, W]`, intrinsics
    `[V, 3, 3]`, poses `[V, 4, 4]`, and the backbone's target features fp16 `[V, D, h, w]`."""

    scene_id: str
    image_ids: list[str]
    images: torch.Tensor
    masks: torch.Tensor
    K: torch.Tensor
    world_to_camera: torch.Tensor
    targets: torch.Tensor
    points: np.ndarray
    point_colors: np.ndarray
    camera_centers: np.ndarray

    @property
    def height(self) -> int:
        return self.images.shape[2]

    @property
    def width(self) -> int:
        return self.images.shape[3]

    def image(self, index: int) -> torch.Tensor:
        """`[1, 3, H, W]` float image in [0, 1]."""
        return self.images[index : index + 1].float() / 255.0


def _load_view(frame, image_scale: float, pin: bool = False):
    """A frame's image as Stage I keeps it (uint8 `[1, 3, H, W]`), the float image in [0, 1] the backbone reads
    where that is not the uint8 image / 255 (a resized or high-bit-depth picture; else None: the float copy is
    then made on the device, a quarter of the bytes to upload and no float conversion on the host), its mask
    `[1, 1, H, W]` and its camera, at `image_scale`. With `pin`, the two images are in page-locked memory, for
    an upload that does not wait for the GPU."""
    from ..scene import load_image_pixels, load_mask

    pixels = torch.from_numpy(load_image_pixels(frame.image_path)).permute(2, 0, 1)[None]
    camera, image = frame.camera, None
    if image_scale != 1.0 or pixels.dtype != torch.uint8:
        image = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels
        if image_scale != 1.0:
            camera = camera.scaled(image_scale)
            image = F.interpolate(image, size=(camera.height, camera.width), mode="bilinear", antialias=True)
        image = image.clamp(0, 1)
        pixels = (image * 255).round().to(torch.uint8)
    if frame.mask_path is None:
        mask = torch.ones(1, 1, camera.height, camera.width, dtype=torch.bool)
    elif image_scale != 1.0:
        mask = torch.from_numpy(load_mask(frame.mask_path))[None, None].float()
        mask = F.interpolate(mask, size=(camera.height, camera.width), mode="bilinear") > 0.5
    else:
        mask = torch.from_numpy(load_mask(frame.mask_path))[None, None]
    if pin:
        pixels = pixels.pin_memory()
        image = None if image is None else image.pin_memory()
    return pixels, image, mask, camera


def scene_extent(camera_centers: np.ndarray) -> float:
    """3DGS's `cameras_extent`: 1.1 x the largest distance of a camera centre from their mean."""
    centers = np.asarray(camera_centers, dtype=np.float64)
    radius = np.linalg.norm(centers - centers.mean(axis=0), axis=1).max() if len(centers) else 0.0
    return 1.1 * max(float(radius), 1e-6)


@torch.no_grad()
def load_scene_data(
    scene, extractor, image_scale: float, device: torch.device, progress: bool = True, bf16: bool = False
) -> SceneData:
    """Loads a scene's images and masks at `image_scale`, and computes the backbone features once.

    Args:
        scene: a `fit3d_hf.scene.Scene`.
        extractor: a `fit3d_hf.backbones.DenseFeatureExtractor` (images in [0, 1] -> `[B, D, h, w]`).
        bf16: run the backbone under bfloat16 autocast (Stage I's `--mixed_precision bf16`; FiT3D: fp32).
    """
    images, masks, Ks, poses, targets = [], [], [], [], []
    # the next views are read and resized on threads while the backbone runs on this one. On CUDA they are
    # uploaded from page-locked memory: an upload from pageable memory waits for the GPU to finish the batch
    # queued before it, so this thread then launched the next batch only once the GPU had run dry (the phase
    # ran at 115 views/s where its backbone alone runs 471 and its readers 730, H100, session 17)
    cuda = device.type == "cuda"
    loaded = map_ahead(
        functools.partial(_load_view, image_scale=image_scale, pin=cuda), scene.frames, _READ_THREADS
    )
    batch_size = _TARGET_BATCH.get(device.type, 1)
    batch = []  # the backbone's inputs on the device, run as one batch
    start, waiting = time.perf_counter(), 0.0
    for index in tqdm(
        range(len(scene.frames)), desc=f"{scene.scene_id}: target features", disable=not progress
    ):
        before = time.perf_counter()
        pixels, image, mask, camera = next(loaded)
        waiting += time.perf_counter() - before
        pixels = pixels.to(device, non_blocking=cuda)
        batch.append(pixels.float() / 255.0 if image is None else image.to(device, non_blocking=cuda))
        if len(batch) == batch_size or index == len(scene.frames) - 1:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                targets.append(extractor(torch.cat(batch)).to(torch.float16))
            batch = []
        images.append(pixels)
        masks.append(mask)
        Ks.append(torch.from_numpy(camera.K).float())
        poses.append(torch.from_numpy(camera.world_to_camera).float())
    # which side bounds this phase: the readers (decoding, resizing) or the backbone
    logger.info(
        "%s: %d views read and encoded in %.1f s, %.1f s of it waiting for the image readers",
        scene.scene_id, len(scene.frames), time.perf_counter() - start, waiting,
    )  # fmt: skip
    return SceneData(
        scene_id=scene.scene_id,
        image_ids=[frame.image_id for frame in scene.frames],
        images=torch.cat(images).to(device),
        masks=torch.cat(masks).to(device),
        K=torch.stack(Ks).to(device),
        world_to_camera=torch.stack(poses).to(device),
        targets=torch.cat(targets).to(device),
        points=np.asarray(scene.points),
        point_colors=np.asarray(scene.point_colors),
        camera_centers=np.stack([frame.camera.center for frame in scene.frames]),
    )
