"""What `mimood-eval` does, as one library call: calibrate a run when it needs it, compare MIM-OOD with the
baselines on labelled scans, add the scan-level OOD table, and write the JSON and pictures.

    report = evaluate_run("runs/x", "scans/", json_path="eval.json")   # tables printed through `say`
    report.result["pixel"]["mimood"]["dice"], report.text, report.calibration

Calibration (`<run>/calibration.json`, mimood.eval.calibrate) is (re)made first when asked (`recalibrate`), when
the run has none, or when it lacks thresholds for a method to evaluate (mimood-demo calibrates MIM-OOD only).
It uses the methods asked for (default: every method the run has) with the run's own loop settings: R, T,
lambda and seed given here are evaluation options. `slice_stride` also thins the hold-out slices restored for
the voxel thresholds. With `train_critic`, the Token Critic baseline is trained first (then calibrated).

The OOD table (mimood.eval.ood.eval_tables: the MOODv2 scores on MVTM features) is added when the run has fitted
OOD statistics (`<run>/ood.safetensors`) and `ood` is true: its slice and scan rows under "slice"/"scan", its
token rows beside the methods' under "token", and its counts, aggregation and chosen score under "ood".
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from mimood.config import LAM_PERCENTILE, RunConfig
from mimood.contract import atomic_write
from mimood.eval.calibrate import CALIBRATION, calibrate, load_calibration
from mimood.eval.evaluate import evaluate
from mimood.eval.methods import available_methods
from mimood.eval.tables import TABLES, format_table, to_json
from mimood.ood.scan import OOD_FILE


@dataclass
class EvalReport:
    calibration: dict | None                  # the run's calibration.json (as used)
    result: dict | None = None                # the JSON contract (None when only calibrating)
    text: str = ""                            # every table, as printed
    pictures: list[Path] = field(default_factory=list)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def evaluate_run(run: str | Path, data: str | Path | None = None, modality: str = "t2",
                 json_path: str | Path | None = None, png_dir: str | Path | None = None, R: int | None = None,
                 T: int | None = None, lam: float | None = None, seed: int | None = None,
                 methods: tuple[str, ...] | None = None, max_cases: int | None = None, slice_stride: int = 1,
                 recalibrate: bool = False, lam_percentile: float | None = LAM_PERCENTILE,
                 voxel_percentile: float = 99.0, train_critic: bool = False, ood: bool = True,
                 progress: bool = True, say: Callable[[str], None] = print,
                 note: Callable[[str], None] = _stderr) -> EvalReport:
    """Calibrate (when needed) and evaluate `run` on the labelled scans under `data` (module docstring). `say`
    gets the results (tables, files written), `note` the notices (what is recalibrated and why).
    lam_percentile=None keeps the configured lambda (the paper's 0.005) when calibrating."""
    run = Path(run)
    if data is None and not (recalibrate or train_critic):
        raise ValueError("give data (scans to evaluate), recalibrate or train_critic")
    if train_critic:
        from mimood.eval.token_critic import train_token_critic
        trained = train_token_critic(run, progress=progress)
        say(f"trained {run / 'critic'}: {trained.steps} steps in {trained.seconds:.0f} s, val {trained.last_val}")
        recalibrate = True                                    # the critic needs its threshold
    run_cfg = RunConfig.load(run / "config.json").restore
    cal = load_calibration(run)
    uncalibrated = [m for m in (methods or available_methods(run)) if cal and m not in cal.get("methods", {})]
    if recalibrate or cal is None or (data is not None and uncalibrated):
        if cal is None and not recalibrate:
            note(f"{run} has no {CALIBRATION}: calibrating on its healthy hold-out first")
        elif not recalibrate:
            note(f"{run / CALIBRATION} has no thresholds for {', '.join(uncalibrated)}: recalibrating")
        cal = calibrate(run, run_cfg, methods, lam_percentile=lam_percentile, voxel_percentile=voxel_percentile,
                        slice_stride=slice_stride, progress=progress)
        say(f"wrote {run / CALIBRATION}: " + ", ".join(
            f"{m} lam={v['lam']:.4g} thr={v['threshold']:.4g}" if "lam" in v else f"{m} thr={v['threshold']:.4g}"
            for m, v in cal["methods"].items()))
    report = EvalReport(cal)
    if data is None:
        return report

    overrides = {k: v for k, v in (("R", R), ("T", T), ("seed", seed)) if v is not None}
    res = evaluate(run, data, replace(run_cfg, **overrides), methods, lam=lam, modality=modality,
                   max_cases=max_cases, slice_stride=slice_stride, progress=progress)
    s = res.settings
    for path in s["skipped_unlabelled"]:
        note(f"skipped {path}: no label")
    lams = ", ".join(f"{m}={v:.4g}" for m, v in s["lams"].items())
    say(f"{s['cases']} cases, {s['slices']} slices (stride {s['slice_stride']}), R={s['R']} T={s['T']} "
        f"seed={s['seed']}" + (f", token thresholds {lams}" if lams else ""))
    if lam is not None or (s["calibration"]["R"], s["calibration"]["T"]) != (s["R"], s["T"]):
        say(f"note: calibrated thresholds were chosen with R={s['calibration']['R']} "
            f"T={s['calibration']['T']} lam={s['calibration']['lam']:.4g}")
    tables = [fn(res) for fn in TABLES]
    texts = [format_table(t) for t in tables]
    for t in texts:
        say("\n" + t)
    result = to_json(res, tables)
    if ood and (run / OOD_FILE).exists():
        # MOODv2 scores on MVTM features: scan.<score>, slice.<score> and token.<score> beside the methods' rows
        from mimood.eval.ood import eval_tables
        table, text = eval_tables(run, data, modality, max_cases, slice_stride, progress=progress)
        say("\n" + text)
        texts.append(text)
        result["scan"], result["slice"] = table["scan"], table["slice"]
        result.setdefault("token", {}).update(table["token"])
        result["ood"] = {k: table[k] for k in ("counts", "aggregation", "scan_score")}
    elif ood:
        say(f"\n(no scan-level OOD table: {run} has no {OOD_FILE}; run `mimood-train ood -o {run}`)")
    report.result, report.text = result, "\n\n".join(texts)
    if json_path is not None:
        with atomic_write(json_path) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
        say(f"\nwrote {json_path}")
    if png_dir is not None:
        from mimood.eval.pictures import save_overlays
        report.pictures = save_overlays(res, png_dir)
        say(f"wrote {len(report.pictures)} pictures to {png_dir}")
    return report
