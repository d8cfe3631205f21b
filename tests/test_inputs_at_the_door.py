"""Inputs checked at the door: all missing files counted, COLMAP line numbers as in the file, 16-bit pictures
scaled by their bit depth, FiT3DModel's pixel_values refused or warned about when they are not images in [0, 1]."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from test_readers import make_scannetpp_scene
from transformers import Dinov2Config
from transformers.utils import logging as transformers_logging

from fit3d_hf import FiT3DConfig, FiT3DModel
from fit3d_hf.errors import MissingInputError
from fit3d_hf.images import to_8bit, to_float_rgb
from fit3d_hf.scene import load_image, load_image_pixels, read_scene


def test_a_scene_with_many_missing_images_counts_them_and_names_the_first_few(tmp_path):
    make_scannetpp_scene(tmp_path / "s", np.random.default_rng(0), num_frames=9, with_extras=False)
    for index in (1, 2, 3, 5, 6, 7, 8):
        (tmp_path / "s" / "images" / f"DSC{index:05d}.JPG").unlink()
    with pytest.raises(MissingInputError) as error_info:
        read_scene(tmp_path / "s")
    shown = ", ".join(str(tmp_path / "s" / "images" / f"DSC{i:05d}.JPG") for i in (1, 2, 3, 5, 6))
    assert str(error_info.value) == (
        f"{tmp_path / 's' / 'transforms_train.json'}: 7 files it lists for its 9 frames do not exist: {shown} and 2 more"
    )
    # One missing file keeps its own message (frame and file named).
    make_scannetpp_scene(tmp_path / "t", np.random.default_rng(0), num_frames=3, with_extras=False)
    (tmp_path / "t" / "masks" / "DSC00001.png").unlink()
    with pytest.raises(
        MissingInputError, match=r"frames\[1\] \(DSC00001.JPG\): mask .*DSC00001.png does not exist"
    ):
        read_scene(tmp_path / "t")


def test_colmap_errors_give_the_line_number_in_the_file(tmp_path):
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    header = "# Camera list with one line of data per camera:\n#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]\n# Number of cameras: 2\n"
    (tmp_path / "cameras.txt").write_text(header + "1 PINHOLE 40 30 30 30 20 15\n2 PINHOLE 40 30 1 2 3\n")
    (tmp_path / "images.txt").write_text("# Image list\n#\n#\n1 1 0 0 0 0 0 0 1 a.png\n\n")
    with pytest.raises(ValueError, match=r"cameras.txt, camera line 5: PINHOLE takes 4 parameters, got 3"):
        read_scene(tmp_path)
    (tmp_path / "cameras.txt").write_text(header + "1 PINHOLE 40 30 30 30 20 15\n")
    (tmp_path / "images.txt").write_text(
        "# Image list\n#\n#\n1 1 0 0 0 0 0 0 1 a.png\n\n2 1 0 0 0 0 0 0 7 b.png\n\n"
    )
    with pytest.raises(ValueError, match=r"images.txt, image line 6 \(b.png\): camera 7 is not in"):
        read_scene(tmp_path)


def test_16_bit_pictures_are_scaled_by_their_bit_depth(tmp_path):
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, size=(12, 16), dtype=np.uint8)
    Image.fromarray(grey8).save(tmp_path / "grey8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(
        tmp_path / "grey16.png"
    )  # the same picture in 16 bits
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    np.testing.assert_array_equal(load_image(tmp_path / "grey16.png"), load_image(tmp_path / "grey8.png"))
    dark = Image.fromarray(np.array([[0, 1000], [2000, 4000]], np.uint16))  # a dark picture stays dark
    np.testing.assert_allclose(
        to_float_rgb(dark)[:, :, 0], np.array([[0, 1000], [2000, 4000]]) / 65535, rtol=1e-6
    )
    assert np.asarray(to_8bit(dark)).tolist() == [[0, 4], [8, 16]]
    assert to_8bit(Image.fromarray(grey8)).mode == "L"  # 8-bit pictures pass unchanged


def test_lossless_pixels_are_uint8_for_8_bit_pictures_and_float_for_deeper_ones(tmp_path):
    """`load_image_pixels` (Stage I's readers): an 8-bit picture as uint8 whose / 255 is `load_image`'s float
    image, RGBA without its alpha; a 16-bit grey one as `load_image`'s float image itself (not rounded)."""
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, size=(6, 5, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    pixels = load_image_pixels(tmp_path / "rgba.png")
    assert pixels.dtype == np.uint8 and pixels.flags.writeable
    np.testing.assert_array_equal(pixels, rgba[:, :, :3])
    np.testing.assert_array_equal(pixels.astype(np.float32) / 255.0, load_image(tmp_path / "rgba.png"))
    Image.fromarray(np.array([[0, 1000], [2000, 65535]], np.uint16)).save(tmp_path / "grey16.png")
    deep = load_image_pixels(tmp_path / "grey16.png")
    assert deep.dtype == np.float32 and deep.shape == (2, 2, 3)
    np.testing.assert_array_equal(deep, load_image(tmp_path / "grey16.png"))
    assert deep[0, 1, 0] == np.float32(1000 / 65535)


@pytest.fixture(scope="module")
def tiny_model():
    backbone = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        patch_size=7,
        image_size=28,
    )
    torch.manual_seed(0)
    return FiT3DModel(FiT3DConfig(backbone_config=backbone, backbone=None)).eval()


def test_pixel_values_must_be_float_images_in_0_1(tiny_model, caplog):
    images = torch.rand(1, 3, 28, 35)
    with pytest.raises(
        ValueError, match=r"pixel_values are torch.uint8, .*convert them with `pixel_values.float\(\) / 255`"
    ):
        tiny_model((images * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"must be \[B, 3, H, W\]"):
        tiny_model(images[:, :2])
    transformers_logging.warning_once.cache_clear()  # "once" is per process: start from a clean slate
    with caplog.at_level(logging.WARNING):
        tiny_model(images)
        assert not caplog.records  # images in [0, 1]: no warning
        tiny_model(images * 255)
        tiny_model(images * 255)
    warnings = [r for r in caplog.records if "far outside [0, 1]" in r.getMessage()]
    assert len(warnings) == 1  # once, not at every call


def test_an_8_bit_and_a_16_bit_copy_give_the_same_features_through_the_readers(tmp_path, tiny_model):
    grey8 = np.random.default_rng(1).integers(0, 256, size=(28, 35), dtype=np.uint8)
    Image.fromarray(grey8).save(tmp_path / "a.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "b.png")
    features = [
        tiny_model(torch.from_numpy(load_image(tmp_path / name)).permute(2, 0, 1)[None]).features
        for name in ("a.png", "b.png")
    ]
    torch.testing.assert_close(features[0], features[1], rtol=0, atol=0)
