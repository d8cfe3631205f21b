"""Point clouds in PLY files (vertices with optional colours), read and written with `plyfile`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from plyfile import PlyData, PlyElement, PlyParseError

from fit3d_hf.errors import CorruptFileError, InputError, MissingInputError
from fit3d_hf.utils import atomic_path

__all__ = ["read_ply_points", "write_ply_points"]

# Colour of PLY vertices that carry none.
_GREY = 128
# What plyfile raises on a damaged file besides its own PlyParseError: a duplicate property name or a
# negative count (ValueError), a header or ASCII body that is not ASCII (UnicodeDecodeError, a ValueError),
# an ASCII value out of its type's range (OverflowError), a forged ASCII vertex count (MemoryError).
_DAMAGE_ERRORS = (ValueError, OverflowError, MemoryError)


def read_ply_points(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """Reads the vertices of a PLY file (ascii or binary).

    Returns:
        `([M, 3] float64 xyz, [M, 3] uint8 rgb)`; vertices without colour are grey (128).

    Raises:
        MissingInputError: no file at `path`.
        CorruptFileError: not a PLY file, a malformed header, a truncated body.
        InputError: a PLY file without vertex coordinates, or NaN / infinite coordinates.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"point cloud {path} does not exist")
    with open(path, "rb") as handle:
        if handle.readline().strip() != b"ply":
            raise CorruptFileError(f"{path} is not a PLY file (no 'ply' magic line)")
    try:
        # Binary elements are memory-mapped: plyfile checks a forged count against the file size first.
        ply = PlyData.read(str(path))
    except (PlyParseError, *_DAMAGE_ERRORS) as error:
        raise CorruptFileError(f"{path}: malformed or truncated PLY file ({error})") from error
    if "vertex" not in ply:
        raise InputError(f"{path}: PLY file has no vertex element")
    vertices = ply["vertex"]
    columns = {prop.name: vertices[prop.name] for prop in vertices.properties}
    if not all(axis in columns for axis in "xyz"):
        raise InputError(f"{path}: PLY vertices have no x, y, z properties")
    try:
        xyz = np.stack([columns[axis] for axis in "xyz"], axis=1).astype(np.float64)
    except (TypeError, ValueError) as error:  # a list property named x, y or z
        raise InputError(f"{path}: PLY vertex coordinates x, y, z must be scalar properties") from error
    if not np.isfinite(xyz).all():
        raise InputError(f"{path}: PLY vertices hold NaN or infinite coordinates")
    return xyz, _colours(path, columns, vertices.count)


def _colours(path: Path, columns: dict[str, np.ndarray], count: int) -> np.ndarray:
    """`[M, 3]` uint8 vertex colours from red/green/blue (or r/g/b) properties, grey without them; float
    colours are in [0, 1]."""
    color_names = next(
        (names for names in (("red", "green", "blue"), ("r", "g", "b")) if all(n in columns for n in names)),
        None,
    )
    if color_names is None:
        return np.full((count, 3), _GREY, dtype=np.uint8)
    try:
        rgb = np.stack([columns[name] for name in color_names], axis=1).astype(np.float64)
    except (TypeError, ValueError) as error:  # a list property named like a colour
        raise InputError(f"{path}: PLY vertex colours must be scalar properties") from error
    if any(columns[name].dtype.kind == "f" for name in color_names):
        rgb = rgb * 255.0  # float colours are in [0, 1]
    return np.clip(np.nan_to_num(np.rint(rgb), nan=_GREY), 0, 255).astype(np.uint8)


def write_ply_points(path: Path | str, points: np.ndarray, colors: np.ndarray) -> Path:
    """Writes a binary little-endian PLY point cloud with double xyz and uchar rgb.

    Args:
        path: output file.
        points: `[M, 3]` xyz (stored as float64 so that a round trip is exact).
        colors: `[M, 3]` uint8 rgb.
    """
    path = Path(path)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    colors = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    if len(points) != len(colors):
        raise ValueError(f"{len(points)} points but {len(colors)} colours")
    dtype = np.dtype(
        [("x", "<f8"), ("y", "<f8"), ("z", "<f8"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    )
    vertices = np.empty(len(points), dtype=dtype)
    for index, axis in enumerate("xyz"):
        vertices[axis] = points[:, index]
    for index, channel in enumerate(("red", "green", "blue")):
        vertices[channel] = colors[:, index]
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        PlyData([PlyElement.describe(vertices, "vertex")], byte_order="<").write(handle)
    return path
