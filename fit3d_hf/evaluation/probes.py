"""Linear probes on frozen features, and the side-by-side comparison original / fine-tuned / FiT3D.

One frozen forward pass of a `FiT3DModel` per batch feeds three probes at once, one per feature variant:

- ``original``: the original backbone's patch features (D channels);
- ``finetuned``: the 3D-aware fine-tuned backbone's alone (D);
- ``fit3d``: their concatenation (2D), FiT3D's features; for depth with the *original* backbone's CLS token,
  as FiT3D's depth probe does.

(`--baseline` adds a ``baseline`` row for any plain backbone.) The heads are independent, so training them
together on one summed loss gives each exactly the updates it would get alone (AdamW is per parameter;
gradient clipping is done per head), at a third of the backbone cost.

Probes (FiT3D's protocol, see `ProbeArguments` for the defaults):

- segmentation: BatchNorm + 1x1 conv, cross-entropy at label resolution, AdamW lr 1e-3 wd 1e-4, poly schedule
  with linear warm-up, random rescale/crop/flip and photometric distortion; mIoU, mAcc, aAcc;
- depth: 256-bin classification head on un-normed features ⊕ CLS, SigLoss + 0.5 x gradient loss, AdamW lr
  1e-4 wd 0.01, cosine schedule with warm-up, gradient clipping 35; RMSE, AbsRel, δ thresholds;
- correspondence (no training): mutual-nearest-neighbour matching of the dense features between views of a
  scene, recall within 5/10/20 px of the ground truth from depth and poses, binned by viewpoint change;
- normals: BatchNorm + 1x1 conv to unit camera-frame normals, angular loss; mean / median angular error and
  the share within 11.25/22.5/30 degrees (`fit3d_hf.evaluation.normals`, `normals_probe`).

`run_probe` (`fit3d evaluate`, `training/evaluate_probe.py`) loads the models (`features`) and the data (`data`,
`samples`), runs one probe (`segmentation_depth_probe`, `normals_probe`, `correspondence_probe`, over the loop of
`training`) and writes the report (`report`).

Runs on one device or under `accelerate launch` (the heads train with DDP; metrics are gathered with
`gather_for_metrics`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..distributed import end_run
from ..trackers import available_tracker
from ..utils import atomic_path
from .arguments import PROBES, ModelArguments, ProbeArguments, parse_size
from .correspondence_probe import evaluate_correspondence
from .data import ProbeDataArguments, first_rows, load_probe_dataset, parse_class_names, resolve_split
from .features import load_frozen_features
from .heads import ProbeHeads
from .normals_probe import train_and_score_normals
from .protocol import apply_preset
from .report import build_results, write_report
from .samples import ProbeDataset
from .segmentation_depth_probe import train_and_score

# ModelArguments, ProbeArguments and PROBES are imported from here by `fit3d evaluate`, the demo and
# training/evaluate_probe.py, with `run_probe`.
__all__ = ["PROBES", "ModelArguments", "ProbeArguments", "run_probe"]


def _save_heads_atomic(heads: ProbeHeads, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    state = {key: value.detach().cpu().contiguous() for key, value in heads.state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(state, str(temporary), metadata=metadata)


def run_probe(model_args: ModelArguments, data_args: ProbeDataArguments, probe_args: ProbeArguments) -> dict:
    """Evaluates the models of `model_args` with one probe and writes the report to `probe_args.output_dir`.

    Returns:
        The results dictionary written to `results.json` (see `fit3d_hf.evaluation.report`).
    """
    from accelerate.utils import set_seed

    data_args, probe_args = apply_preset(data_args, probe_args)
    args = probe_args.resolved()
    output_dir = Path(args.output_dir)
    tracker = available_tracker(args.report_to)
    accelerator = _make_accelerator(tracker, output_dir)
    set_seed(args.seed)
    features = load_frozen_features(
        model_args.model,
        model_args.baseline,
        normalization=model_args.normalization,
        dtype=model_args.backbone_dtype,
        patch_fit=args.patch_fit,
    )
    with accelerator.main_process_first():
        splits = load_probe_dataset(
            data_args.dataset,
            dataset_format=data_args.dataset_format,
            config_name=data_args.dataset_config,
            cache_dir=data_args.cache_dir,
            holdout_every=data_args.holdout_every,
        )
    eval_name, eval_split = _evaluation_split(splits, data_args, args, accelerator)
    dataset_kwargs = _dataset_kwargs(eval_split, data_args, args)
    if tracker:
        accelerator.init_trackers(
            "fit3d-evaluate",
            config={
                k: v
                for k, v in {**asdict(model_args), **asdict(data_args), **asdict(args)}.items()
                if isinstance(v, (int, float, str, bool))
            },
        )

    channels = {variant: features.channels(variant) for variant in features.variants}
    class_names = parse_class_names(data_args.class_names)
    train_name, metrics, heads, history = _run(
        features, splits, eval_split, data_args, args, accelerator, dataset_kwargs, class_names
    )
    results = build_results(
        args.probe,
        metrics,
        channels=channels,
        history=history,
        settings={
            "model": model_args.model, "baseline": model_args.baseline, "dataset": data_args.dataset,
            "train_split": train_name, "split": eval_name, "num_processes": accelerator.num_processes,
            "probe": {k: v for k, v in asdict(args).items()}, "data": asdict(data_args),
        },
    )  # fmt: skip
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_report(results, output_dir)
        if heads is not None and args.save_heads:
            _save_heads_atomic(
                heads,
                output_dir / "probe_heads.safetensors",
                {"probe": args.probe, "variants": ",".join(heads.variants)},
            )
    end_run(accelerator)  # barrier, prepared heads released, then the process group (safe on gloo)
    return results


def _make_accelerator(tracker: str | None, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    return Accelerator(
        log_with=tracker,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def _evaluation_split(splits, data_args: ProbeDataArguments, args: ProbeArguments, accelerator):
    """`(name, split)` evaluated: --split (or the default), its first --max_eval_samples rows, and for the
    correspondence probe with --gaussians the depth rendered from Stage I's Gaussians where frames have none."""
    eval_name, eval_split = resolve_split(splits, data_args.split, "eval")
    eval_split = first_rows(eval_split, data_args.max_eval_samples)
    if data_args.gaussians and args.probe == "correspondence":
        from .rendered_depth import fill_depth_from_gaussians

        eval_split = fill_depth_from_gaussians(
            eval_split, data_args.gaussians, depth_column=data_args.depth_column, depth_scale=data_args.depth_scale,
            device=accelerator.device,
        )  # fmt: skip
    return eval_name, eval_split


def _dataset_kwargs(eval_split, data_args: ProbeDataArguments, args: ProbeArguments) -> dict:
    """The `ProbeDataset` options of the data options (columns, depth scale, labels, image size, normals axes)."""
    # Scenes' frames (scannetpp or scenes builder) carry validity masks in a 'mask' column: used by default.
    scenes = "is_test" in eval_split.column_names and "world_to_camera" in eval_split.column_names
    columns = data_args.columns("mask" if scenes and "mask" in eval_split.column_names else None)
    image_size = parse_size(data_args.image_size)
    return {
        "columns": columns, "depth_scale": data_args.depth_scale, "reduce_zero_label": data_args.reduce_zero_label,
        "ignore_index": args.ignore_index, "image_size": image_size, "normals_axes": data_args.normals_axes,
    }  # fmt: skip


def _run(features, splits, eval_split, data_args, args, accelerator, dataset_kwargs, class_names):
    """The probe of `args.probe`: `(train split name, metrics per variant, trained heads, loss history)` (no
    training split, heads or history for the correspondence probe)."""
    if args.probe == "correspondence":
        metrics = evaluate_correspondence(
            features, ProbeDataset(eval_split, "correspondence", **dataset_kwargs), args, accelerator
        )
        return None, metrics, None, {}
    if args.probe == "normals":
        return train_and_score_normals(
            features, splits, eval_split, data_args, args, accelerator, dataset_kwargs
        )
    return train_and_score(
        features, splits, eval_split, data_args, args, accelerator, dataset_kwargs, class_names
    )
