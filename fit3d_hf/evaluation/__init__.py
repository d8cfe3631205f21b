"""Evaluation: linear probes (segmentation, depth, surface normals), the multi-view correspondence probe, metrics
and reports."""

from .correspondence import (
    CorrespondenceProbeOptions,
    Correspondences,
    correspondence_probe,
    correspondence_recall,
    feature_consistency,
    mutual_nearest_neighbours,
    patch_correspondences,
    viewpoint_angle,
)
from .data import ColumnMapping, ProbeDataArguments, ProbeDataset, RandomScaleCropFlip, load_probe_dataset
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
from .probes import (
    FrozenFeatures,
    ModelArguments,
    ProbeArguments,
    evaluate_probe,
    load_frozen_features,
    run_probe,
    train_probe,
)
from .report import VARIANT_LABELS, build_results, results_markdown, write_report

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
