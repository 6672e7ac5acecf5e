"""The main job end to end on the built-in demo data (what `mimood-demo` and `make demo` run):

    demo data -> train (VQ-VAE, MVTM, ATD, AR) -> calibrate on held-out healthy slices -> export ONNX
    -> infer on the demo test scans -> check the masks against the demo lesion labels

Each stage is the library call its command makes; each stage is skipped when its output already exists, so
an interrupted demo continues where it stopped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from mimood.config import preset as make_preset


def run_demo(out: str | Path, preset: str = "cpu", steps: int | None = None, say: Callable[[str], None] = print,
             progress: bool = True, backend: str = "auto") -> dict:
    from mimood.data.demo import make_demo
    from mimood.eval.calibrate import calibrate
    from mimood.export.export import export_run
    from mimood.runtime.infer import infer_folder
    from mimood.train.recipes import train

    out = Path(out)
    data, run, export, maps = out / "data", out / "run", out / "run" / "export", out / "maps"
    result: dict = {"folder": str(out)}

    say(f"[1/6] demo data -> {data}")
    if not (data / "demo.json").exists():
        make_demo(data, progress=progress)
    cfg = make_preset(preset)
    if steps is not None:
        for o in (cfg.optim_vqvae, cfg.optim_transformer):
            o.steps, o.val_every, o.warmup_steps = steps, min(o.val_every, steps), min(o.warmup_steps, steps // 10)

    say(f"[2/6] training the {preset} preset -> {run}")
    result["train"] = train("all", run, cfg, [data / "train"], resume=(run / "config.json").exists(),
                            progress=progress)

    say(f"[3/6] calibrating lambda and the map threshold on held-out healthy slices -> {run / 'calibration.json'}")
    if not (run / "calibration.json").exists():
        # MIM-OOD only: the demo infers with it; mimood-eval adds the baselines' thresholds when it needs them
        calibrate(run, methods=("mimood",), progress=progress)

    say(f"[4/6] exporting ONNX graphs -> {export}")
    sources = [run / "calibration.json", *run.glob("*/best.safetensors")]
    if not _newer(export / "manifest.json", sources):
        export_run(run, export, batch=cfg.restore.batch, progress=progress)
    result["export"] = str(export)

    say(f"[5/6] anomaly maps of the demo test scans -> {maps}")
    report = infer_folder(data / "test" / "images", maps, export, backend=backend, resume=True, progress=progress)
    result["report"] = str(report.path)
    result["backend"] = report.backend

    say("[6/6] demo masks against the demo lesion labels (Dice at the calibrated threshold)")
    result["cases"] = demo_dice(maps, data / "test" / "labels")
    for name, c in result["cases"].items():
        say(f"  {name}: " + (f"Dice {c['dice']:.3f} ({c['lesion_voxels']} lesion voxels, {c['flagged_voxels']} flagged)"
                             if c["lesion_voxels"] else f"healthy scan, {c['flagged_voxels']} voxels flagged"))
    return result


def _newer(target: Path, sources: list[Path]) -> bool:
    """target exists and was written after every source (a stage's output is up to date)."""
    return target.exists() and all(target.stat().st_mtime_ns > s.stat().st_mtime_ns for s in sources)


def demo_dice(maps: Path, labels: Path) -> dict[str, dict]:
    """Per case: Dice between `<maps>/<name>_mask.nii.gz` and `<labels>/<name>.nii.gz` (lesion = label > 0) on
    the input's own grid (both files share it), with the lesion and flagged voxel counts."""
    import nibabel as nib

    from mimood.eval.metrics import dice

    cases = {}
    for label in sorted(labels.glob("*.nii*")):
        name = label.name.split(".nii")[0]
        mask = maps / f"{name}_mask.nii.gz"
        if mask.exists():
            pred, gt = np.asarray(nib.load(mask).dataobj) > 0, np.asarray(nib.load(label).dataobj) > 0
            cases[name] = {"dice": dice(pred, gt), "lesion_voxels": int(gt.sum()), "flagged_voxels": int(pred.sum())}
    return cases
