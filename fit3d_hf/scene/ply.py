"""Point clouds from PLY files (vertices with optional colours)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["read_ply_points"]

# Colour of PLY vertices that carry none.
_GREY = 128

# A small vertex-only PLY reader: the project only needs xyz + rgb of a point cloud, and no PLY package
# (plyfile, open3d, trimesh) is a dependency; numpy's structured dtypes read the binary variants directly.
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip


def read_ply_points(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """Reads the vertices of a PLY file (ascii or binary).

    Returns:
        `([M, 3] float64 xyz, [M, 3] uint8 rgb)`; vertices without colour are grey (128).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"point cloud {path} does not exist")
    with open(path, "rb") as handle:
        if handle.readline().strip() != b"ply":
            raise ValueError(f"{path} is not a PLY file (no 'ply' magic line)")
        fmt, elements = None, []  # elements: [name, count, [(property, dtype or None for lists)]]
        while True:
            line = handle.readline()
            if not line:
                raise ValueError(f"{path}: PLY header has no end_header")
            tokens = line.decode("ascii", errors="replace").split()
            if not tokens or tokens[0] in ("comment", "obj_info"):
                continue
            if tokens[0] == "end_header":
                break
            if tokens[0] == "format":
                fmt = tokens[1]
            elif tokens[0] == "element":
                elements.append([tokens[1], int(tokens[2]), []])
            elif tokens[0] == "property" and elements:
                is_list = tokens[1] == "list"
                if not is_list and tokens[1] not in _PLY_TYPES:
                    raise ValueError(f"{path}: unknown PLY property type {tokens[1]!r}")
                elements[-1][2].append((tokens[-1], None if is_list else _PLY_TYPES[tokens[1]]))
        if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
            raise ValueError(f"{path}: unknown PLY format {fmt!r}")
        names = [element[0] for element in elements]
        if "vertex" not in names:
            raise ValueError(f"{path}: PLY file has no vertex element")
        before = elements[: names.index("vertex")]
        _, count, properties = elements[names.index("vertex")]
        if any(dtype is None for _, dtype in properties) or any(
            dtype is None for element in before for _, dtype in element[2]
        ):
            raise ValueError(f"{path}: list properties before or in the vertex element are not supported")
        if fmt == "ascii":
            skip = sum(element[1] for element in before)
            for _ in range(skip):
                handle.readline()
            rows = [handle.readline().decode("ascii") for _ in range(count)]
            table = np.loadtxt(rows, ndmin=2, dtype=np.float64) if count else np.zeros((0, len(properties)))
            columns = {name: table[:, i] for i, (name, _) in enumerate(properties)}
        else:
            endian = "<" if fmt == "binary_little_endian" else ">"
            for element in before:
                handle.seek(element[1] * np.dtype([(n, endian + t) for n, t in element[2]]).itemsize, 1)
            dtype = np.dtype([(name, endian + t) for name, t in properties])
            data = np.frombuffer(handle.read(count * dtype.itemsize), dtype=dtype)
            if len(data) != count:
                raise ValueError(f"{path}: PLY file is truncated ({len(data)} of {count} vertices)")
            columns = {name: data[name] for name in dtype.names}
    if not all(axis in columns for axis in "xyz"):
        raise ValueError(f"{path}: PLY vertices have no x, y, z properties")
    xyz = np.stack([columns[axis] for axis in "xyz"], axis=1).astype(np.float64)
    color_names = next(
        (names for names in (("red", "green", "blue"), ("r", "g", "b")) if all(n in columns for n in names)),
        None,
    )
    if color_names is None:
        rgb = np.full((count, 3), _GREY, dtype=np.uint8)
    else:
        rgb = np.stack([columns[name] for name in color_names], axis=1).astype(np.float64)
        if any(np.dtype(t).kind == "f" for name, t in properties if name in color_names):
            rgb = rgb * 255.0  # float colours are in [0, 1]
        rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return xyz, rgb
