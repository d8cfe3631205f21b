"""Property-based tests of the scene readers: transforms.json (nerfstudio), COLMAP text, the ScanNet++ layout
and PLY, fed malformed JSON, missing or mistyped keys, truncated lines, wrong counts, NaN and inf.

The property: reading a damaged scene either gives a valid scene (finite cameras, every image loadable) or
raises one of the project's named errors (`fit3d_hf.errors.Fit3DError`) whose message names the scene's
folder, i.e. the file at fault. A raw KeyError, IndexError, TypeError, UnicodeDecodeError or struct.error
fails the test.
"""

import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from fuzz_helpers import FUZZ_SETTINGS, count
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from fit3d_hf.errors import Fit3DError
from fit3d_hf.scene import load_image, load_mask, read_ply_points, read_scene

WIDTH, HEIGHT, VIEWS = 8, 6, 3
FX = FY = 7.0

# --------------------------------------------------------------------------------------------------------
# Valid base scenes (tiny), copied and damaged once per example


def _images(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for index in range(VIEWS):
        name = f"frame_{index:03d}.png"
        Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def _pose(index: int) -> np.ndarray:
    """Camera-to-world, cameras on a line looking down +z (OpenCV)."""
    pose = np.eye(4)
    pose[0, 3] = 0.3 * index
    return pose


def _ascii_ply(points: np.ndarray) -> str:
    header = ["ply", "format ascii 1.0", f"element vertex {len(points)}", "property float x", "property float y",
              "property float z", "property uchar red", "property uchar green", "property uchar blue", "end_header"]  # fmt: skip
    rows = [f"{x:.4f} {y:.4f} {z:.4f} 200 100 50" for x, y, z in points]
    return "\n".join(header + rows) + "\n"


def _points() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(12, 3)) + [0, 0, 3]


def _nerfstudio_base(root: Path) -> None:
    names = _images(root / "images")
    frames = []
    for index, name in enumerate(names):
        opengl = _pose(index) @ np.diag([1.0, -1.0, -1.0, 1.0])
        frames.append({"file_path": f"images/{name}", "transform_matrix": opengl.tolist()})
    (root / "points.ply").write_text(_ascii_ply(_points()))
    meta = {"fl_x": FX, "fl_y": FY, "cx": WIDTH / 2, "cy": HEIGHT / 2, "w": WIDTH, "h": HEIGHT, "camera_model": "OPENCV",
            "k1": 0.01, "frames": frames, "ply_file_path": "points.ply", "test_filenames": [f"images/{names[-1]}"]}  # fmt: skip
    (root / "transforms.json").write_text(json.dumps(meta, indent=1))


def _scannetpp_base(root: Path) -> None:
    names = _images(root / "images")
    masks = root / "masks"
    masks.mkdir()
    frames = []
    for index, name in enumerate(names):
        Image.fromarray(np.full((HEIGHT, WIDTH), 255, np.uint8)).save(masks / name)
        # ScanNet++'s nerfstudio frame: any rigid pose is fine for the reader
        frames.append({"file_path": name, "mask_path": name, "transform_matrix": _pose(index).tolist()})
    meta = {"fl_x": FX, "fl_y": FY, "cx": WIDTH / 2, "cy": HEIGHT / 2, "w": WIDTH, "h": HEIGHT, "camera_model": "PINHOLE",
            "frames": frames, "test_frames": frames[-1:]}  # fmt: skip
    (root / "transforms_train.json").write_text(json.dumps(meta, indent=1))
    rows = [f"{i + 1} {x:.4f} {y:.4f} {z:.4f} 200 100 50 0.5 1 2" for i, (x, y, z) in enumerate(_points())]
    (root / "points3D.txt").write_text("# 3D point list\n" + "\n".join(rows) + "\n")


def _colmap_base(root: Path) -> None:
    names = _images(root / "images")
    model = root / "sparse" / "0"
    model.mkdir(parents=True)
    # PINHOLE: the undistortion path is fuzzed through the nerfstudio base (OPENCV, k1 = 0.01), once is enough
    (model / "cameras.txt").write_text(
        f"# Camera list\n1 PINHOLE {WIDTH} {HEIGHT} {FX} {FY} {WIDTH / 2} {HEIGHT / 2}\n"
    )
    lines = ["# Image list"]
    for index, name in enumerate(names):
        world_to_camera = np.linalg.inv(_pose(index))
        t = world_to_camera[:3, 3]
        lines += [f"{index + 1} 1 0 0 0 {t[0]} {t[1]} {t[2]} 1 {name}", "1.0 2.0 -1"]
    (model / "images.txt").write_text("\n".join(lines) + "\n")
    rows = [f"{i + 1} {x:.4f} {y:.4f} {z:.4f} 200 100 50 0.5 1 2" for i, (x, y, z) in enumerate(_points())]
    (model / "points3D.txt").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_bases")
    for name, build in (
        ("nerfstudio", _nerfstudio_base),
        ("scannetpp", _scannetpp_base),
        ("colmap", _colmap_base),
    ):
        (root / name).mkdir()
        build(root / name)
    for name in ("nerfstudio", "scannetpp", "colmap"):  # the bases themselves are valid
        assert len(read_scene(root / name, cache_dir=root / "cache" / name).frames) == VIEWS
    return root


# --------------------------------------------------------------------------------------------------------
# Damage


SPECIAL_NUMBERS = [
    "nan",
    "inf",
    "-inf",
    "1e400",
    "-1",
    "0",
    "-0",
    "1e-320",
    "99999999999999999999999",
    "0x10",
    "abc",
    "",
    "1,5",
    "\u00e9",
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)
JSON_KEYS = ["fl_x", "fl_y", "cx", "cy", "w", "h", "k1", "k4", "p1", "camera_model", "camera_angle_x", "is_fisheye", "frames",
             "test_frames", "file_path", "mask_path", "transform_matrix", "ply_file_path", "test_filenames", "depth_file_path"]  # fmt: skip


def _damage_json(data, text: str, draw) -> str:
    """1-3 structural changes of a transforms file (then maybe byte-level damage of its text)."""
    meta = json.loads(text)
    for _ in range(draw(st.integers(1, 3))):
        frames = meta.get("frames") if isinstance(meta, dict) else None
        target = meta
        if isinstance(frames, list) and frames and draw(st.booleans()):
            target = frames[draw(st.integers(0, len(frames) - 1))]
        if not isinstance(target, dict):
            break
        op = draw(st.sampled_from(["set", "delete", "matrix", "frames"]))
        key = draw(st.sampled_from(JSON_KEYS))
        if op == "set":
            target[key] = draw(json_values)
        elif op == "delete":
            target.pop(key, None)
        elif op == "matrix" and isinstance(target.get("transform_matrix"), list):
            matrix = target["transform_matrix"]
            row = draw(st.integers(0, len(matrix) - 1)) if matrix else 0
            if matrix and draw(st.booleans()) and isinstance(matrix[row], list) and matrix[row]:
                matrix[row][draw(st.integers(0, len(matrix[row]) - 1))] = draw(
                    st.sampled_from([float("nan"), float("inf"), 1e308, "1", None, [1.0]])
                )
            elif matrix:
                del matrix[row]
        elif op == "frames" and isinstance(frames, list):
            choice = draw(st.sampled_from(["empty", "duplicate", "drop", "not a list"]))
            if choice == "empty":
                meta["frames"] = []
            elif choice == "duplicate" and frames:
                frames.append(json.loads(json.dumps(frames[0])))
            elif choice == "drop" and frames:
                frames.pop()
            else:
                meta["frames"] = {"0": frames[0] if frames else None}
    text = json.dumps(meta, indent=1)  # NaN and Infinity as JSON's non-standard tokens, as many tools write
    return _damage_text(text, draw) if draw(st.integers(0, 3)) == 0 else text


def _damage_text(text: str, draw) -> str:
    """Byte-level damage of a text file: truncation, an inserted character or a removed span."""
    if not text:
        return text
    op = draw(st.sampled_from(["truncate", "insert", "remove"]))
    position = draw(st.integers(0, len(text) - 1))
    if op == "truncate":
        return text[:position]
    if op == "insert":
        return (
            text[:position]
            + draw(st.sampled_from(["{", "]", '"', ",", "\x00", "\ufffd", "\n", " nan "]))
            + text[position:]
        )
    return text[:position] + text[position + draw(st.integers(1, 20)) :]


def _damage_lines(text: str, draw) -> str:
    """Damage of a whitespace-separated text table (COLMAP, points3D.txt, ascii PLY): 1-3 changes of lines
    and tokens, or byte-level damage."""
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        if not lines:
            break
        index = draw(st.integers(0, len(lines) - 1))
        tokens = lines[index].split()
        op = draw(
            st.sampled_from(["token", "truncate_line", "drop_line", "duplicate_line", "insert_line", "bytes"])
        )
        if op == "token" and tokens:
            tokens[draw(st.integers(0, len(tokens) - 1))] = draw(
                st.sampled_from(SPECIAL_NUMBERS) | st.text(max_size=5)
            )
            lines[index] = " ".join(tokens)
        elif op == "truncate_line":
            lines[index] = " ".join(tokens[: draw(st.integers(0, max(len(tokens) - 1, 0)))])
        elif op == "drop_line":
            del lines[index]
        elif op == "duplicate_line":
            lines.insert(index, lines[index])
        elif op == "insert_line":
            lines.insert(index, draw(st.text(max_size=30)))
        else:
            return _damage_text("\n".join(lines) + "\n", draw)
    return "\n".join(lines) + "\n"


def _damage_image(path: Path, draw) -> None:
    data = path.read_bytes()
    op = draw(st.sampled_from(["truncate", "flip", "garbage"]))
    if op == "truncate":
        path.write_bytes(data[: draw(st.integers(0, len(data) - 1))])
    elif op == "flip":
        damaged = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            damaged[draw(st.integers(0, len(damaged) - 1))] ^= 1 << draw(st.integers(0, 7))
        path.write_bytes(bytes(damaged))
    else:
        path.write_bytes(draw(st.binary(max_size=64)))


def _check(folder: Path, cache: Path) -> str:
    """Reads the damaged scene; returns "read" or "refused", fails on anything but a named error."""
    try:
        scene = read_scene(folder, cache_dir=cache)
        for frame in scene.frames:
            assert np.isfinite(frame.camera.K).all() and np.isfinite(frame.camera.world_to_camera).all()
            load_image(frame.image_path)
            if frame.mask_path is not None:
                load_mask(frame.mask_path)
    except Fit3DError as error:
        assert folder.name in str(error) or folder.name in str(getattr(error, "filename", "")), (
            f"no file named in: {error}"
        )
        return "refused"
    return "read"


def _fuzz_layout(bases, layout: str, data, damage) -> str:
    work = Path(tempfile.mkdtemp(prefix=f"fuzz_{layout}_"))
    try:
        folder = work / f"scene_{layout}"
        shutil.copytree(bases / layout, folder)
        damage(folder, data.draw)
        return _check(folder, work / "cache")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _maybe_damage_an_image(folder: Path, draw) -> None:
    if draw(st.integers(0, 4)) == 0:
        images = sorted((folder / "images").glob("*.png"))
        _damage_image(images[draw(st.integers(0, len(images) - 1))], draw)


# --------------------------------------------------------------------------------------------------------
# The properties


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzzed_transforms_json_gets_a_named_error(bases, data):
    def damage(folder, draw):
        path = folder / "transforms.json"
        path.write_text(_damage_json(data, path.read_text(), draw), encoding="utf-8", errors="surrogatepass")
        _maybe_damage_an_image(folder, draw)
        if draw(st.integers(0, 4)) == 0:
            ply = folder / "points.ply"
            ply.write_text(_damage_lines(ply.read_text(), draw), errors="surrogatepass")

    count("transforms.json", _fuzz_layout(bases, "nerfstudio", data, damage) == "refused")


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzzed_colmap_text_gets_a_named_error(bases, data):
    def damage(folder, draw):
        model = folder / "sparse" / "0"
        for name in draw(
            st.lists(
                st.sampled_from(["cameras.txt", "images.txt", "points3D.txt"]),
                min_size=1,
                max_size=3,
                unique=True,
            )
        ):
            (model / name).write_text(_damage_lines((model / name).read_text(), draw), errors="surrogatepass")
        _maybe_damage_an_image(folder, draw)

    count("colmap text", _fuzz_layout(bases, "colmap", data, damage) == "refused")


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzzed_scannetpp_layout_gets_a_named_error(bases, data):
    def damage(folder, draw):
        what = draw(st.sampled_from(["json", "points", "both", "mask", "missing"]))
        if what in ("json", "both"):
            path = folder / "transforms_train.json"
            path.write_text(_damage_json(data, path.read_text(), draw), errors="surrogatepass")
        if what in ("points", "both"):
            path = folder / "points3D.txt"
            path.write_text(_damage_lines(path.read_text(), draw), errors="surrogatepass")
        if what == "mask":
            _damage_image(sorted((folder / "masks").glob("*.png"))[0], draw)
        if what == "missing":
            victim = draw(st.sampled_from(["points3D.txt", "images/frame_000.png", "masks/frame_001.png"]))
            (folder / victim).unlink()

    count("scannetpp layout", _fuzz_layout(bases, "scannetpp", data, damage) == "refused")


def _binary_ply(points: np.ndarray, endian: str = "<") -> bytes:
    name = "binary_little_endian" if endian == "<" else "binary_big_endian"
    header = (f"ply\nformat {name} 1.0\ncomment x\nelement vertex {len(points)}\nproperty double x\nproperty double y\n"
              "property double z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")  # fmt: skip
    body = b"".join(struct.pack(f"{endian}dddBBB", *p, 10, 20, 30) for p in points)
    return header.encode() + body


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzzed_ply_gets_a_named_error(data):
    draw = data.draw
    points = _points()
    kind = draw(st.sampled_from(["ascii", "binary_little_endian", "binary_big_endian"]))
    content = (
        _ascii_ply(points).encode()
        if kind == "ascii"
        else _binary_ply(points, "<" if kind == "binary_little_endian" else ">")
    )
    header_end = content.index(b"end_header\n") + len(b"end_header\n")
    op = draw(st.sampled_from(["header", "body", "truncate", "flip", "garbage"]))
    if op == "header":
        header = _damage_lines(content[:header_end].decode(), draw)
        content = header.encode("utf-8", "surrogatepass") + content[header_end:]
    elif op == "body" and kind == "ascii":
        content = content[:header_end] + _damage_lines(content[header_end:].decode(), draw).encode(
            "utf-8", "surrogatepass"
        )
    elif op == "truncate":
        content = content[: draw(st.integers(0, len(content) - 1))]
    elif op in ("flip", "body"):
        damaged = bytearray(content)
        for _ in range(draw(st.integers(1, 6))):
            damaged[draw(st.integers(0, len(damaged) - 1))] ^= 1 << draw(st.integers(0, 7))
        content = bytes(damaged)
    else:
        content = draw(st.binary(max_size=200))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed_points.ply"
        path.write_bytes(content)
        refused = False
        try:
            xyz, rgb = read_ply_points(path)
        except Fit3DError as error:
            assert "fuzzed_points.ply" in str(error), str(error)
            refused = True
        else:
            assert xyz.dtype == np.float64 and xyz.shape[1] == 3 and np.isfinite(xyz).all()
            assert rgb.dtype == np.uint8 and rgb.shape == xyz.shape
    count("PLY", refused)
