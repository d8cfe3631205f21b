"""Point clouds from PLY files (vertices with optional colours)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fit3d_hf.errors import CorruptFileError, InputError, MissingInputError

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

    Raises:
        MissingInputError: no file at `path`.
        CorruptFileError: not a PLY file, a malformed header, a truncated body.
        InputError: a PLY file this reader does not handle, or NaN / infinite coordinates.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"point cloud {path} does not exist")
    with open(path, "rb") as handle:
        if handle.readline().strip() != b"ply":
            raise CorruptFileError(f"{path} is not a PLY file (no 'ply' magic line)")
        fmt, elements = _read_header(handle, path)
        names = [element[0] for element in elements]
        if "vertex" not in names:
            raise InputError(f"{path}: PLY file has no vertex element")
        before = elements[: names.index("vertex")]
        _, count, properties = elements[names.index("vertex")]
        if any(dtype is None for _, dtype in properties) or any(
            dtype is None for element in before for _, dtype in element[2]
        ):
            raise InputError(f"{path}: list properties before or in the vertex element are not supported")
        if len({name for name, _ in properties}) != len(properties):
            raise CorruptFileError(f"{path}: the vertex element repeats a property name")
        if fmt == "ascii":
            columns = _read_ascii_vertices(handle, path, sum(element[1] for element in before), count, properties)
        else:
            endian = "<" if fmt == "binary_little_endian" else ">"
            skip = sum(element[1] * np.dtype([(n, endian + t) for n, t in element[2]]).itemsize for element in before)
            dtype = np.dtype([(name, endian + t) for name, t in properties])
            remaining = path.stat().st_size - handle.tell()
            if skip + count * dtype.itemsize > remaining:  # checked before reading: a forged count reads nothing
                raise CorruptFileError(
                    f"{path}: PLY file is truncated (its header announces {count} vertices of {dtype.itemsize} B "
                    f"after {skip} B of other elements, but only {remaining} B follow the header)"
                )
            handle.seek(skip, 1)
            data = np.frombuffer(handle.read(count * dtype.itemsize), dtype=dtype)
            columns = {name: data[name] for name in dtype.names}
    if not all(axis in columns for axis in "xyz"):
        raise InputError(f"{path}: PLY vertices have no x, y, z properties")
    xyz = np.stack([columns[axis] for axis in "xyz"], axis=1).astype(np.float64)
    if not np.isfinite(xyz).all():
        raise InputError(f"{path}: PLY vertices hold NaN or infinite coordinates")
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
        rgb = np.clip(np.nan_to_num(np.rint(rgb), nan=_GREY), 0, 255).astype(np.uint8)
    return xyz, rgb


def _read_header(handle, path: Path) -> tuple[str | None, list]:
    """The format and elements of a PLY header: `[name, count, [(property, dtype or None for lists)]]`."""
    fmt, elements = None, []
    for number in range(2, 100_000):  # a header of more lines than this is not one
        line = handle.readline()
        if not line:
            raise CorruptFileError(f"{path}: PLY header has no end_header")
        try:
            tokens = line.decode("ascii").split()
        except UnicodeDecodeError as error:
            raise CorruptFileError(f"{path}: PLY header line {number} is not ASCII text") from error
        if not tokens or tokens[0] in ("comment", "obj_info"):
            continue
        if tokens[0] == "end_header":
            break
        if tokens[0] == "format":
            if len(tokens) < 2:
                raise CorruptFileError(f"{path}: PLY header line {number}: 'format' without a format name")
            fmt = tokens[1]
        elif tokens[0] == "element":
            if len(tokens) != 3 or not tokens[2].isdigit():
                raise CorruptFileError(f"{path}: PLY header line {number}: expected 'element <name> <count>', got {line.strip()[:80]!r}")
            elements.append([tokens[1], int(tokens[2]), []])
        elif tokens[0] == "property" and elements:
            is_list = len(tokens) >= 2 and tokens[1] == "list"
            if len(tokens) != (5 if is_list else 3):
                raise CorruptFileError(f"{path}: PLY header line {number}: malformed property {line.strip()[:80]!r}")
            if not is_list and tokens[1] not in _PLY_TYPES:
                raise InputError(f"{path}: unknown PLY property type {tokens[1]!r}")
            elements[-1][2].append((tokens[-1], None if is_list else _PLY_TYPES[tokens[1]]))
    else:
        raise CorruptFileError(f"{path}: PLY header has no end_header")
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise InputError(f"{path}: unknown PLY format {fmt!r}")
    return fmt, elements


def _read_ascii_vertices(handle, path: Path, skip: int, count: int, properties: list) -> dict[str, np.ndarray]:
    """The vertex columns of an ASCII PLY body: `count` lines of `len(properties)` numbers, after `skip` lines."""
    for _ in range(skip):
        if not handle.readline():
            raise CorruptFileError(f"{path}: PLY file is truncated (it ends before its vertices)")
    remaining = path.stat().st_size - handle.tell()
    if count * max(len(properties), 1) * 2 > remaining:  # each value takes a digit and a separator at least
        raise CorruptFileError(f"{path}: PLY file is truncated (its header announces {count} vertices, {remaining} B follow)")
    table = np.zeros((count, len(properties)))
    for row in range(count):
        line = handle.readline()
        if not line:
            raise CorruptFileError(f"{path}: PLY file is truncated ({row} of {count} vertices)")
        try:
            values = [float(token) for token in line.decode("ascii").split()]
        except (UnicodeDecodeError, ValueError) as error:
            raise CorruptFileError(f"{path}: PLY vertex {row} is not a line of numbers") from error
        if len(values) != len(properties):
            raise CorruptFileError(f"{path}: PLY vertex {row} has {len(values)} values, expected {len(properties)}")
        table[row] = values
    return {name: table[:, i] for i, (name, _) in enumerate(properties)}
