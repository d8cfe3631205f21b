"""Evaluation: linear probes (segmentation, depth, surface normals), the multi-view correspondence probe, metrics
and reports.

From the command down: `probes` (`run_probe`, `fit3d evaluate`) -> one probe (`segmentation_depth_probe`,
`normals_probe`, `correspondence_probe`) -> the training loop (`training`) on the frozen models (`features`) ->
samples (`samples`, decoded by `fit3d_hf.row_decoding`) from a data set (`data`, `columns`) with their transforms
(`transforms`, `photometric`, in the reference order of `protocol`). Options: `arguments`, `data`. Pieces:
`heads`, `normals`, `correspondence`, `metrics`, `report`, `rendered_depth`.
"""

from .arguments import ModelArguments, ProbeArguments
from .columns import ColumnMapping
from .correspondence import (
    Correspondences,
    correspondence_recall,
    feature_consistency,
    mutual_nearest_neighbours,
    patch_correspondences,
    viewpoint_angle,
)
from .correspondence_probe import CorrespondenceProbeOptions, correspondence_probe
from .data import ProbeDataArguments, load_probe_dataset
from .features import FrozenFeatures, load_frozen_features
from .heads import (
    LinearDepthHead,
    LinearSegmentationHead,
    ProbeHeads,
    build_probe_heads,
    gradient_loss,
    sig_loss,
)
from .metrics import depth_errors, depth_scores, segmentation_areas, segmentation_scores
from .normals import (
    LinearNormalsHead,
    NormalsHeads,
    angular_errors,
    angular_loss,
    normals_rows,
    normals_scores,
)
from .probes import run_probe
from .report import VARIANT_LABELS, build_results, results_markdown, write_report
from .samples import ProbeDataset
from .segmentation_depth_probe import evaluate_probe
from .training import train_probe
from .transforms import RandomScaleCropFlip

__all__ = [
    "VARIANT_LABELS",
    "ColumnMapping",
    "CorrespondenceProbeOptions",
    "Correspondences",
    "FrozenFeatures",
    "LinearDepthHead",
    "LinearNormalsHead",
    "LinearSegmentationHead",
    "ModelArguments",
    "NormalsHeads",
    "ProbeArguments",
    "ProbeDataArguments",
    "ProbeDataset",
    "ProbeHeads",
    "RandomScaleCropFlip",
    "angular_errors",
    "angular_loss",
    "build_probe_heads",
    "build_results",
    "correspondence_probe",
    "correspondence_recall",
    "depth_errors",
    "depth_scores",
    "evaluate_probe",
    "feature_consistency",
    "gradient_loss",
    "load_frozen_features",
    "load_probe_dataset",
    "mutual_nearest_neighbours",
    "normals_rows",
    "normals_scores",
    "patch_correspondences",
    "results_markdown",
    "run_probe",
    "segmentation_areas",
    "segmentation_scores",
    "sig_loss",
    "train_probe",
    "viewpoint_angle",
    "write_report",
]
