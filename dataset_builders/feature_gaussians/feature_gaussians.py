"""`datasets` builder for Stage I outputs: one row per scene's Gaussian bundle, for sharing on the Hub.

Expected layout under `data_dir` (what `fit3d lift` / `training/lift_features.py` write)::

    <scene_id>/gaussians.safetensors   # the bundle (see fit3d_hf.gaussians.bundle)
    <scene_id>/metrics.json            # optional: Stage I metrics, kept as a JSON string column

Columns: scene_id, backbone, feature_dim, backbone_dim, num_gaussians, means (N x 3 float32),
quats (N x 4 float16), log_scales (N x 3 float16), opacities (N float16), features (N x F float16),
decoder_weight (flattened float32, as `load_bundle` returns it: lossless for every bundle version, though
version-3 bundles store it in fp16) with decoder_shape, the SH colours in the bundle's compressed form
(`fit3d_hf.gaussians.sh_codec`: sh_degree, sh_dc_codes N x 3 uint8, sh_dc_offset / sh_dc_step 3 float32,
sh_rest_codebook C x R float16, sh_rest_codes N uint16; 5 bytes per Gaussian instead of 96 for fp16 SH, so
a row is about as small as the bundle file) and metrics. Version-1 bundles (fp16 SH) are compressed while the
rows are built. Rows are built as Arrow tables directly (fixed-size lists over flat buffers): converting
million-row nested Python lists would take minutes per scene.

Stage II reads bundles through `fit3d_hf.gaussians.load_bundle` (memory-mapped safetensors, no SH);
`bundle_from_row` turns a row of this dataset (e.g. downloaded from the Hub) back into the same object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from fit3d_hf.gaussians import GaussianBundle, load_bundle, read_bundle_metadata
from fit3d_hf.gaussians.bundle import BUNDLE_FILENAME, load_compressed_sh
from fit3d_hf.gaussians.sh_codec import CompressedSH

__all__ = ["FeatureGaussians", "FeatureGaussiansConfig", "bundle_from_row", "load_feature_gaussians"]


@dataclass
class FeatureGaussiansConfig(datasets.BuilderConfig):
    """Config of the `FeatureGaussians` builder.

    Args:
        data_dir: Stage I output folder with one `<scene_id>/gaussians.safetensors` per scene.
        split_name: name of the single split.
    """

    split_name: str = "train"


def _scene_folders(data_dir: Path) -> list[Path]:
    folders = sorted(p.parent for p in data_dir.glob(f"*/{BUNDLE_FILENAME}"))
    if not folders:
        raise FileNotFoundError(
            f"{data_dir} holds no <scene_id>/{BUNDLE_FILENAME}: run Stage I (`fit3d lift`) first"
        )
    return folders


def _fixed(array: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """`[N, k]` numpy array -> one Arrow FixedSizeList value holding N rows of k values."""
    array = np.ascontiguousarray(array)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1), type=arrow_type), array.shape[1])
    return pa.ListArray.from_arrays(pa.array([0, len(array)], type=pa.int32()), inner)


class FeatureGaussians(datasets.ArrowBasedBuilder):
    """One row per scene: the feature Gaussians of Stage I."""

    BUILDER_CONFIG_CLASS = FeatureGaussiansConfig
    BUILDER_CONFIGS = [FeatureGaussiansConfig(name="default")]

    def _feature_dim(self) -> tuple[int, int]:
        """F and R = 3 * ((degree + 1) ** 2 - 1), the higher-order SH values per codebook row."""
        first = read_bundle_metadata(_scene_folders(Path(self.config.data_dir))[0])
        return int(first["feature_dim"]), ((int(first["sh_degree"]) + 1) ** 2 - 1) * 3

    def _info(self) -> datasets.DatasetInfo:
        if not self.config.data_dir:
            raise ValueError("FeatureGaussians needs data_dir: the Stage I output folder")
        feature_dim, sh_rest_values = self._feature_dim()
        half, single = datasets.Value("float16"), datasets.Value("float32")
        return datasets.DatasetInfo(
            description="FiT3D Stage I feature Gaussians, one row per scene",
            features=datasets.Features(
                {
                    "scene_id": datasets.Value("string"),
                    "backbone": datasets.Value("string"),
                    "feature_dim": datasets.Value("int32"),
                    "backbone_dim": datasets.Value("int32"),
                    "num_gaussians": datasets.Value("int64"),
                    "means": datasets.List(datasets.List(single, length=3)),
                    "quats": datasets.List(datasets.List(half, length=4)),
                    "log_scales": datasets.List(datasets.List(half, length=3)),
                    "opacities": datasets.List(half),
                    "features": datasets.List(datasets.List(half, length=feature_dim)),
                    "sh_degree": datasets.Value("int32"),
                    "sh_dc_codes": datasets.List(datasets.List(datasets.Value("uint8"), length=3)),
                    "sh_dc_offset": datasets.List(single, length=3),
                    "sh_dc_step": datasets.List(single, length=3),
                    "sh_rest_codebook": datasets.List(datasets.List(half, length=sh_rest_values)),
                    "sh_rest_codes": datasets.List(datasets.Value("uint16")),
                    "decoder_weight": datasets.List(single),
                    "decoder_shape": datasets.List(datasets.Value("int32"), length=4),
                    "metrics": datasets.Value("string"),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        folders = _scene_folders(Path(self.config.data_dir))
        return [datasets.SplitGenerator(name=self.config.split_name, gen_kwargs={"folders": folders})]

    def _generate_tables(self, folders):
        for index, folder in enumerate(folders):
            bundle = load_bundle(folder)  # geometry, features, decoder; the SH stay compressed
            sh = load_compressed_sh(folder)
            metrics_path = folder / "metrics.json"
            metrics = metrics_path.read_text() if metrics_path.is_file() else "{}"
            weight = bundle.decoder_weight.numpy()
            columns = {
                "scene_id": pa.array([bundle.scene_id or folder.name]),
                "backbone": pa.array([bundle.backbone]),
                "feature_dim": pa.array([bundle.feature_dim], type=pa.int32()),
                "backbone_dim": pa.array([bundle.backbone_dim], type=pa.int32()),
                "num_gaussians": pa.array([len(bundle)], type=pa.int64()),
                "means": _fixed(bundle.means.numpy(), pa.float32()),
                "quats": _fixed(bundle.quats.numpy(), pa.float16()),
                "log_scales": _fixed(bundle.log_scales.numpy(), pa.float16()),
                "opacities": pa.ListArray.from_arrays(
                    pa.array([0, len(bundle)], type=pa.int32()),
                    pa.array(bundle.opacities.numpy(), type=pa.float16()),
                ),
                "features": _fixed(bundle.features.numpy(), pa.float16()),
                "sh_degree": pa.array([int(round(sh.num_coefficients**0.5)) - 1], type=pa.int32()),
                "sh_dc_codes": _fixed(sh.dc_codes.numpy(), pa.uint8()),
                "sh_dc_offset": pa.array([sh.dc_offset.tolist()], type=pa.list_(pa.float32(), 3)),
                "sh_dc_step": pa.array([sh.dc_step.tolist()], type=pa.list_(pa.float32(), 3)),
                "sh_rest_codebook": _fixed(sh.rest_codebook.numpy(), pa.float16()),
                "sh_rest_codes": pa.ListArray.from_arrays(
                    pa.array([0, len(sh)], type=pa.int32()), pa.array(sh.rest_codes.numpy(), type=pa.uint16())
                ),
                "decoder_weight": pa.ListArray.from_arrays(
                    pa.array([0, weight.size], type=pa.int32()),
                    pa.array(weight.reshape(-1), type=pa.float32()),
                ),
                "decoder_shape": pa.array([list(weight.shape)], type=pa.list_(pa.int32(), 4)),
                "metrics": pa.array([metrics]),
            }
            yield index, pa.table(columns)


def bundle_from_row(row: dict) -> GaussianBundle:
    """A row of this dataset in numpy format (`dataset.with_format("numpy")[i]`) -> a `GaussianBundle`,
    with the SH colours decoded to float32 (the same values as `load_bundle(..., include_sh=True)`)."""
    import torch

    def tensor(name, dtype):
        return torch.from_numpy(
            np.stack(row[name]).astype(dtype)
            if row[name].dtype == object
            else np.asarray(row[name], dtype=dtype)
        )

    sh = CompressedSH(
        dc_codes=tensor("sh_dc_codes", np.uint8).reshape(-1, 3),
        dc_offset=tensor("sh_dc_offset", np.float32),
        dc_step=tensor("sh_dc_step", np.float32),
        rest_codebook=tensor("sh_rest_codebook", np.float16).reshape(len(row["sh_rest_codebook"]), -1),
        rest_codes=tensor("sh_rest_codes", np.uint16),
    )
    return GaussianBundle(
        means=tensor("means", np.float32),
        quats=tensor("quats", np.float16),
        log_scales=tensor("log_scales", np.float16),
        opacities=tensor("opacities", np.float16),
        features=tensor("features", np.float16),
        decoder_weight=tensor("decoder_weight", np.float32).reshape(*[int(v) for v in row["decoder_shape"]]),
        metadata={
            "scene_id": str(row["scene_id"]),
            "backbone": str(row["backbone"]),
            "metrics": json.loads(str(row["metrics"])),
        },
        sh=sh.decode(),
    )


def load_feature_gaussians(data_dir: str, cache_dir: str | None = None) -> datasets.Dataset:
    """Builds (or reuses from the cache) and returns the dataset of a Stage I output folder."""
    builder = FeatureGaussians(data_dir=data_dir, cache_dir=cache_dir)
    builder.download_and_prepare()
    return builder.as_dataset(split=builder.config.split_name)
