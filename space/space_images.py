"""The Space's pictures in and out: uploads decoded and refused with a clear message when they are not images,
any image made RGB and capped in size, and the patch pictures enlarged and marked for display."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from fit3d_hf.images import to_8bit

__all__ = [
    "MARKER_COLOR",
    "downscale_notice",
    "draw_marker",
    "open_image",
    "prepare_image",
    "upscale_patches",
]

MARKER_COLOR = (0, 255, 255)  # cyan: absent from inferno, so the marker never reads as a similarity value


def prepare_image(image: Image.Image | np.ndarray, max_side: int) -> Image.Image:
    """Any PIL image or array -> an RGB image whose long side is at most `max_side`.

    Transparent pixels are composited onto white; grayscale, palette, CMYK and 16-bit images become RGB
    (16-bit ones scaled by their bit depth, as the scene readers do, not stretched to their maximum).

    Args:
        image: PIL image, or `[H, W]` / `[H, W, 3|4]` array (uint8, uint16, or float in [0, 1]).
        max_side: cap on the long side in pixels (larger images are downscaled, aspect kept).

    Returns:
        A new RGB `PIL.Image`.
    """
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype == np.uint16:  # scaled by the bit depth, like 16-bit files
            array = (array.astype(np.float64) * (255.0 / 65535.0)).round().astype(np.uint8)
        elif array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise gr.Error(
                f"Expected an image array of shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}"
            )
        image = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    image = ImageOps.exif_transpose(image)
    # High-bit-depth grey pictures: scaled by their bit depth, as the scene readers do (PIL's convert would
    # clip them at 255), so an 8-bit and a 16-bit copy of a picture give the same features.
    image = to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    try:
        image = image.convert("RGB")
    except ValueError as error:
        raise gr.Error(f"Cannot convert a {image.mode} image to RGB: {error}") from error
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def open_image(value) -> Image.Image | np.ndarray | None:
    """Decodes what an image handler receives into a PIL image, refusing non-images with a clear message.

    The app's events run with `preprocess=False`, so handlers get gradio's raw upload payload (a dict with the
    cached file's `path` and the user's `orig_name`) and decode it here: gradio's own decoding would turn a
    non-image file into an anonymous server error. Calls from Python may pass a PIL image, an array or a path.

    Args:
        value: upload payload, PIL image, array, file path, or None.

    Returns:
        The PIL image (decoded) or the array; None for None.
    """
    if value is None or isinstance(value, (Image.Image, np.ndarray)):
        return value
    if isinstance(value, (str, Path)):
        source, name = value, Path(value).name
    elif isinstance(value, dict) and (value.get("path") or str(value.get("url") or "").startswith("data:")):
        name = value.get("orig_name") or Path(value.get("path") or "upload").name
        if value.get("path"):
            source = value["path"]
        else:  # an inline data URL
            source = io.BytesIO(base64.b64decode(value["url"].split(",", 1)[1]))
    else:
        raise gr.Error(f"Expected an image upload, got {type(value).__name__}.")
    try:
        image = Image.open(source)
        image.load()
    except UnidentifiedImageError as error:
        raise gr.Error(
            f"{name} is not an image: its format was not recognised. Upload a PNG, JPEG, WebP, BMP, GIF or "
            "TIFF image."
        ) from error
    except Image.DecompressionBombError as error:
        raise gr.Error(f"{name} is too large to decode safely: {error}") from error
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt files
        raise gr.Error(f"{name} could not be read as an image: {error}") from error
    return image


def downscale_notice(given_size: tuple[int, int], shown_size: tuple[int, int]) -> str:
    """A visible line when the upload was larger than the Space computes on (empty otherwise)."""
    if tuple(given_size) == tuple(shown_size):
        return ""
    return (
        f"**Note: your {given_size[0]}×{given_size[1]} image was downscaled to {shown_size[0]}×{shown_size[1]} px** "
        "(the Space's size limit). · "
    )


def upscale_patches(picture: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 `[h, w, 3]` patch picture -> `[H, W, 3]` for `size` = (W, H), each patch a solid block."""
    return np.asarray(Image.fromarray(picture).resize(size, Image.Resampling.NEAREST))


def draw_marker(picture: np.ndarray, x: float, y: float, radius: float) -> np.ndarray:
    canvas = Image.fromarray(picture)
    draw = ImageDraw.Draw(canvas)
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=MARKER_COLOR, width=2)
    return np.asarray(canvas)
