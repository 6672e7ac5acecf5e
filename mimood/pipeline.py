"""The main job end to end (what `mimood-demo` and `make demo` run).

Default, no training: the bundled model (mimood/assets/model, see its MODEL_CARD.md) maps

    the demo test scans (generated here: template-derived heads, 6 with painted lesions, 2 healthy)
    -> Dice of the calibrated masks against the demo lesion labels
    + real scans, when the shared test data sits beside the checkout (../shared/data): a BraTS case the bundled
      model never saw (Dice against its expert mask) and a chronic-stroke scan (no mask)

With `train=True` (`mimood-demo --train`), the whole training path on the demo data instead:

    demo data -> train (VQ-VAE, MVTM, ATD, AR) -> calibrate on held-out healthy slices -> export ONNX
    -> infer on the demo test scans -> check the masks against the demo lesion labels

Each stage is the library call its command makes; each stage is skipped when its output already exists, so
an interrupted demo continues where it stopped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mimood.config import preset as make_preset

# real scans for the demo, relative to the shared data folder: (scan, expert mask or None)
DEMO_REAL = (("real/lesion/brats18_2013_20_1_t2.nii.gz", "real/lesion/brats18_2013_20_1_seg.nii.gz"),
             ("real/lesion/stroke_nomask/cstar_stroke_t2.nii.gz", None))


def shared_data(start: str | Path | None = None) -> Path | None:
    """The shared test data folder (`../shared/data` beside the checkout or the working folder), if present."""
    here = Path(__file__).resolve().parents[1]
    for base in ([Path(start)] if start else []) + [Path.cwd(), here]:
        p = base.parent / "shared" / "data"
        if p.is_dir():
            return p
    return None


def run_demo(out: str | Path, model: str | Path | None = None, train: bool = False, preset: str = "cpu",
             steps: int | None = None, say: Callable[[str], None] = print, progress: bool = True,
             backend: str = "auto", real: Sequence[tuple[Path, Path | None]] | None = None) -> dict:
    """`real`: (scan, mask or None) pairs for the last stage; default DEMO_REAL under `shared_data()`."""
    if train:
        return train_demo(out, preset, steps, say, progress, backend)
    from mimood.data.demo import make_demo
    from mimood.runtime.infer import infer_folder
    from mimood.runtime.model import resolve_model

    out = Path(out)
    data, maps = out / "data", out / "maps"
    result: dict = {"folder": str(out)}
    choice = resolve_model(model, say=say)
    result["export"] = str(choice.export)
    if choice.needs_export:
        raise ValueError(f"{choice.run}: export the run first (mimood-export -m {choice.run})")

    say(f"[1/3] demo test scans -> {data / 'test'}")
    if not (data / "demo.json").exists():
        make_demo(data, n_train=0, progress=progress)

    say(f"[2/3] anomaly maps of the demo test scans -> {maps}")
    report = infer_folder(data / "test" / "images", maps, choice.export, backend=backend, resume=True,
                          progress=progress)
    result["report"], result["backend"] = str(report.path), report.backend
    result["cases"] = demo_dice(maps, data / "test" / "labels")
    _say_cases(result["cases"], say)

    if real is None:
        root = shared_data()
        real = [] if root is None else [(root / s, root / m if m else None) for s, m in DEMO_REAL
                                        if (root / s).is_file()]
    say(f"[3/3] real scans -> {out / 'maps_real'}" if real else
        "[3/3] real scans: none found (the shared test data is not beside this checkout); skipped")
    result["real"] = {}
    if real:
        folder = out / "real"
        folder.mkdir(parents=True, exist_ok=True)
        for scan, _ in real:                       # links, so the maps and report use the scans' own names
            link = folder / Path(scan).name
            if not link.exists():
                link.symlink_to(Path(scan).resolve())
        infer_folder(folder, out / "maps_real", choice.export, backend=backend, resume=True, progress=progress)
        for scan, mask in real:
            name = Path(scan).name.split(".nii")[0]
            c = _case(out / "maps_real" / f"{name}_mask.nii.gz", mask)
            if c is not None:
                result["real"][name] = c
        _say_cases(result["real"], say)
    return result


def _say_cases(cases: dict, say: Callable[[str], None]) -> None:
    for name, c in cases.items():
        say(f"  {name}: " + (f"Dice {c['dice']:.3f} ({c['lesion_voxels']} lesion voxels, {c['flagged_voxels']} "
                             f"flagged)" if c["lesion_voxels"] else
                             f"{c['flagged_voxels']} voxels flagged" + ("" if c["labelled"] else " (no mask)")))


def train_demo(out: str | Path, preset: str = "cpu", steps: int | None = None, say: Callable[[str], None] = print,
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
    _say_cases(result["cases"], say)
    return result


def _newer(target: Path, sources: list[Path]) -> bool:
    """target exists and was written after every source (a stage's output is up to date)."""
    return target.exists() and all(target.stat().st_mtime_ns > s.stat().st_mtime_ns for s in sources)


def demo_dice(maps: Path, labels: Path) -> dict[str, dict]:
    """Per case: Dice between `<maps>/<name>_mask.nii.gz` and `<labels>/<name>.nii.gz` (lesion = label > 0) on
    the input's own grid (both files share it), with the lesion and flagged voxel counts."""
    cases = {}
    for label in sorted(labels.glob("*.nii*")):
        name = label.name.split(".nii")[0]
        c = _case(maps / f"{name}_mask.nii.gz", label)
        if c is not None:
            cases[name] = c
    return cases


def _case(mask: Path, label: Path | None) -> dict | None:
    """Dice of a written mask against a label on the same grid (None when the mask was not written); without a
    label only the flagged voxel count."""
    import nibabel as nib

    from mimood.eval.metrics import dice

    if not mask.exists():
        return None
    pred = np.asarray(nib.load(mask).dataobj) > 0
    if label is None:
        return {"dice": None, "lesion_voxels": 0, "flagged_voxels": int(pred.sum()), "labelled": False}
    gt = np.asarray(nib.load(label).dataobj) > 0
    return {"dice": dice(pred, gt), "lesion_voxels": int(gt.sum()), "flagged_voxels": int(pred.sum()),
            "labelled": True}
