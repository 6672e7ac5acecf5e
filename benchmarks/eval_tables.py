"""Paper Tables 1 and 2 (token and pixel level) for MIM-OOD and its baselines, plus an ablation of T, R and lambda.

    python benchmarks/eval_tables.py demo     --run /work/runs/cpu1 --data /work/runs/cpu1/demo_data/test
    python benchmarks/eval_tables.py brats    --run /work/runs/cpu-brats --data ../shared/data/real/lesion
    python benchmarks/eval_tables.py ablation --run /work/runs/cpu-brats --data ../shared/data/real/lesion
    python benchmarks/eval_tables.py diagnose --run /work/runs/cpu1 --data /work/runs/cpu1/demo_data/test
    python benchmarks/eval_tables.py md       (benchmarks/results/eval.md from the JSON files)

Each experiment copies the run's best checkpoints and healthy hold-out into `--work` (the run itself is never
written), calibrates the copy there (`mimood.eval.calibrate`, label-free, on the hold-out only) and evaluates with
`mimood.eval.evaluate`, every method on the same slices. `--slice-stride` / `--max-cases` pick the subset (stated in
the output) so that one experiment takes minutes on a shared 2-core CPU. Results go to
benchmarks/results/eval_{demo,brats,ablation}.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mimood.config import RunConfig
from mimood.data.slices import load_slice_set
from mimood.eval.calibrate import calibrate, healthy_token_scores, load_calibration
from mimood.eval.evaluate import evaluate
from mimood.eval.methods import load_models
from mimood.eval.metrics import token_labels
from mimood.eval.tables import PAPER_NAMES, TABLES, format_table, pixel_table, to_json, token_table
from mimood.models.graphs import encode_slices

RESULTS = Path(__file__).resolve().parent / "results"
MACHINE = "2-core CPU (shared with other jobs; wall times are indicative only)"


def copy_run(src: Path, dst: Path, critic_from: Path | None) -> Path:
    """The files evaluation needs: config, summary, best checkpoints, healthy hold-out (and a critic if given)."""
    for rel in ["config.json", "summary.json", "data/val_slices.npz"] + \
               [f"{k}/best.safetensors" for k in ("vqvae", "atd", "mvtm", "ar")]:
        if (src / rel).exists() and not (dst / rel).exists():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)
    if critic_from is not None and not (dst / "critic" / "best.safetensors").exists():
        (dst / "critic").mkdir(parents=True, exist_ok=True)
        shutil.copy2(critic_from / "best.safetensors", dst / "critic" / "best.safetensors")
    return dst


def calibrated_run(args) -> tuple[Path, dict]:
    run = copy_run(args.run, args.work / args.run.name, args.critic_from)
    cal = load_calibration(run)
    if cal is None:
        t0 = time.perf_counter()
        cal = calibrate(run, slice_stride=args.calibration_stride, progress=False)
        print(f"calibrated {run} in {time.perf_counter() - t0:.0f} s", flush=True)
    return run, cal


def header(args, run: Path) -> dict:
    return {"machine": MACHINE, "cpu": platform.processor() or platform.machine(), "torch_threads":
            torch.get_num_threads(), "run_source": str(args.run), "run_copy": str(run), "data": str(args.data),
            "subset": f"every {args.slice_stride}-th slice" + (f", first {args.max_cases} cases"
                                                               if args.max_cases else ", all labelled cases"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def tables(args, out_name: str) -> None:
    """Both tables (and the time/case tables) for every method the run copy has."""
    run, cal = calibrated_run(args)
    methods = args.methods.split(",") if args.methods else None
    res = evaluate(run, args.data, methods=methods, max_cases=args.max_cases, slice_stride=args.slice_stride,
                   progress=False)
    ts = [fn(res) for fn in TABLES]
    for t in ts:
        print("\n" + format_table(t), flush=True)
    out = {**header(args, run), "calibration": cal["methods"], **to_json(res, ts)}
    _write(RESULTS / out_name, out)


def ablation(args) -> None:
    """MIM-OOD alone, one factor at a time around the default (T=8, R=4, calibrated lambda): T in {1, 4, 8},
    R in {1, 4}, lambda in {the paper's 0.005, P95, P99 (default), P99.9 of healthy ATD token scores}."""
    run, cal = calibrated_run(args)
    cfg = RunConfig.load(run / "config.json").restore
    val = load_slice_set(run / "data" / "val_slices.npz").images.astype(np.float32)
    models = load_models(run, ["mimood"])
    atd = healthy_token_scores(models, encode_slices(models["vqvae"], val, cfg.batch), cfg.batch)["mimood"]
    healthy = atd[token_labels(val > 0).reshape(len(val), -1)]
    lams = {"paper 0.005": 0.005, **{f"P{q:g}": float(np.percentile(healthy, q)) for q in (95, 99.9)}}
    variants = {"default (T=8, R=4, P99)": (cfg, None), "T=1": (replace(cfg, T=1), None),
                "T=4": (replace(cfg, T=4), None), "R=1": (replace(cfg, R=1), None),
                **{f"lambda {k}": (cfg, v) for k, v in lams.items()}}
    rows = {}
    for name, (c, lam) in variants.items():
        res = evaluate(run, args.data, c, ("mimood",), lam=lam, max_cases=args.max_cases,
                       slice_stride=args.slice_stride, progress=False)
        p, t = pixel_table(res).rows["mimood"], token_table(res).rows["mimood"]
        rows[name] = {"T": c.T, "R": c.R, "lam": res.lams["mimood"], "dice": p["dice"], "ap": p["ap"],
                      "auroc": p["auroc"], "token_ap": t["ap"], "token_auroc": t["auroc"],
                      "seconds_per_32_slices": p["seconds_per_32_slices"]}
        print(name, json.dumps(rows[name]), flush=True)
    out = {**header(args, run), "calibrated_lam": cal["lam"],
           "note": "MIM-OOD only, one factor changed at a time; token AP/AUROC are the ATD scores of the input "
                   "tokens (independent of T, R, lambda); pixel metrics pooled over evaluated brain voxels",
           "rows": rows}
    _write(RESULTS / "eval_ablation.json", out)


class _OracleDetector(torch.nn.Module):
    """A perfect ATD for the diagnosis: score 1 on the lesion tokens of each slice, 0 elsewhere."""

    def __init__(self, lesion_tokens: np.ndarray, R: int):
        super().__init__()
        self.scores = torch.from_numpy(lesion_tokens).float().repeat_interleave(R, 0)      # [S*R, N]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.scores


def diagnose(args) -> None:
    """Where MIM-OOD loses: on lesion slices (every 6th per case), pixel metrics of (1) intensity, (2) the VQ-VAE
    reconstruction error alone (lambda = 1: nothing resampled), (3) MIM-OOD at the calibrated lambda, (4) the same
    loop with an oracle detector that masks exactly the lesion tokens. (4) >> (3) means detection, not healing or
    reconstruction error, is what fails. Also the ATD's token AUROC on the lesion tokens."""
    from mimood.data.discover import discover
    from mimood.data.preprocess import preprocess
    from mimood.eval.metrics import pixel_metrics, token_metrics
    from mimood.restore import restore
    from mimood.runtime.torch_backend import TorchEngine
    run, cal = calibrated_run(args)
    run_cfg = RunConfig.load(run / "config.json")
    cfg, models = run_cfg.restore, load_models(run, ["mimood"])
    engine = TorchEngine(models["vqvae"], models["atd"], models["mvtm"], cfg)
    xs, ls = [], []
    for case in [c for c in discover(args.data) if c.label is not None][:args.max_cases]:
        s = preprocess(case.image, run_cfg.data, label=case.label)
        rows = np.flatnonzero(s.labels.any(axis=(1, 2)))[::6]
        xs.append(s.images[rows])
        ls.append(s.labels[rows])
    x, lab = np.concatenate(xs)[:, None].astype(np.float32), np.concatenate(ls)     # [S,1,H,W], [S,H,W]
    brain = x[:, 0] > 0
    lesion_tokens = token_labels(lab).reshape(len(x), -1)                            # [S, N]
    rows = {"intensity": x[:, 0]}
    loops = {"reconstruction error only (lambda = 1)": (engine, 1.0),
             f"MIM-OOD (calibrated lambda {cal['lam']:.3g})": (engine, cal["lam"]),
             "oracle detector (lesion tokens masked)": (TorchEngine(
                 models["vqvae"], models["atd"], models["mvtm"], cfg,
                 detector=_OracleDetector(lesion_tokens, cfg.R)), 0.5)}
    token_scores = None
    for name, (eng, lam) in loops.items():
        r = restore(eng, x, cfg, np.random.default_rng(cfg.seed), lam=lam)
        rows[name] = r.maps
        token_scores = r.token_scores if token_scores is None else token_scores
    out = {name: pixel_metrics(maps[brain], lab[brain]) for name, maps in rows.items()}
    for name, m in out.items():
        print(f"{name:45s} " + " ".join(f"{k} {v:.3f}" for k, v in m.items()), flush=True)
    brain_tokens = token_labels(brain).reshape(len(x), -1)
    atd = token_metrics(token_scores, lesion_tokens, mask=brain_tokens)
    _write(RESULTS / f"eval_diagnosis_{args.data_name}.json", {
        **header(args, run), "subset": "every 6th lesion slice of each labelled case", "slices": len(x),
        "pixel": out, "atd_token": atd,
        "atd_mean": {"lesion_tokens": float(token_scores[lesion_tokens].mean()),
                     "healthy_brain_tokens": float(token_scores[brain_tokens & ~lesion_tokens].mean())},
        "atd_on_synthetic_corruptions": cal["methods"]["mimood"].get("synthetic_corruptions")})


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=lambda v: None) + "\n")
    print(f"wrote {path}", flush=True)


def _f(v, fmt=".3f") -> str:
    return "-" if v is None else format(v, fmt)


def markdown() -> None:
    """benchmarks/results/eval.md: both tables of each test set, and the ablation."""
    lines = ["# MIM-OOD and baselines: paper Tables 1 and 2", "",
             "Written by `benchmarks/eval_tables.py` (see its docstring for the commands). Token level: a token is "
             "a lesion token if any of its 8 x 8 pixels is. Pixel level: pooled over the evaluated brain voxels "
             "(input > 0) on the input grid; [DICE] = best Dice over thresholds; Dice@cal = mean per-case Dice at "
             "the label-free calibrated threshold (P99 of healthy hold-out scores). IT = wall seconds per 32 slices.",
             ""]
    for key, title in (("eval_demo.json", "(a) demo test set"), ("eval_brats.json", "(b) BraTS 2018 T2, 6 cases"),
                       ("eval_brats_cpu1.json", "(b') BraTS 2018 T2, 6 cases, with the run trained on demo data only")):
        if not (RESULTS / key).exists():
            continue
        d = json.loads((RESULTS / key).read_text())
        s = d["settings"]
        lines += [f"## {title}", "",
                  f"Run: `{d['run_source']}` (copy calibrated in `{d['run_copy']}`); data `{d['data']}`; subset: "
                  f"{d['subset']} ({s['cases']} cases, {s['slices']} slices); R={s['R']} T={s['T']} seed={s['seed']}; "
                  f"token thresholds {', '.join(f'{m}={v:.4g}' for m, v in s['lams'].items())}. Machine: "
                  f"{d['machine']}.", "",
                  "| method | token AP | token AUROC | [DICE] | pixel AP | pixel AUROC | Dice@best | Dice@cal "
                  "| IT (s/32) |", "|---|---|---|---|---|---|---|---|---|"]
        for m in s["methods"]:
            t, p = d["token"][m], d["pixel"][m]
            lines.append(f"| {PAPER_NAMES.get(m, m)} | {_f(t['ap'])} | {_f(t['auroc'])} | {_f(p['dice'])} | "
                         f"{_f(p['ap'])} | {_f(p['auroc'])} | {_f(p['case_dice_best_mean'])} | "
                         f"{_f(p['case_dice_calibrated_mean'])} | {_f(p['seconds_per_32_slices'], '.1f')} |")
        lines += [""] + [f"- {n}" for n in d["notes"]["token"] + d["notes"]["pixel"]] + [""]
    if (RESULTS / "eval_ablation.json").exists():
        d = json.loads((RESULTS / "eval_ablation.json").read_text())
        lines += ["## Ablation of T, R and lambda on (b) (MIM-OOD only)", "",
                  f"Run: `{d['run_source']}`; subset: {d['subset']}. {d['note']}.", "",
                  "| variant | T | R | lambda | [DICE] | pixel AP | pixel AUROC | IT (s/32) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in d["rows"].items():
            lines.append(f"| {name} | {r['T']} | {r['R']} | {r['lam']:.4g} | {_f(r['dice'])} | {_f(r['ap'])} | "
                         f"{_f(r['auroc'])} | {_f(r['seconds_per_32_slices'], '.1f')} |")
        lines.append("")
    for path in sorted(RESULTS.glob("eval_diagnosis_*.json")):
        d = json.loads(path.read_text())
        t, a = d["atd_token"], d["atd_mean"]
        lines += [f"## Diagnosis: where MIM-OOD loses ({path.stem})", "",
                  f"Run `{d['run_source']}`, data `{d['data']}`, {d['subset']} ({d['slices']} slices). ATD on these "
                  f"lesion tokens: AP {t['ap']:.3f}, AUROC {t['auroc']:.3f} (mean score {a['lesion_tokens']:.3f} on "
                  f"lesion vs {a['healthy_brain_tokens']:.3f} on healthy brain tokens)."
                  + ("" if not d.get("atd_on_synthetic_corruptions") else
                     f" The same ATD on synthetic random-code corruptions of healthy hold-out slices: AUROC "
                     f"{d['atd_on_synthetic_corruptions']['auroc']:.3f}."), "",
                  "| anomaly map | [DICE] | pixel AP | pixel AUROC |", "|---|---|---|---|"]
        lines += [f"| {name} | {_f(m['dice'])} | {_f(m['ap'])} | {_f(m['auroc'])} |" for name, m in d["pixel"].items()]
        lines.append("")
    (RESULTS / "eval.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / 'eval.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("demo", "brats", "ablation", "diagnose", "md"))
    ap.add_argument("--run", type=Path, help="trained run folder (copied, never written)")
    ap.add_argument("--data", type=Path, help="labelled test scans")
    ap.add_argument("--work", type=Path, default=Path("/tmp/eval_tables"), help="where the calibrated copy lives")
    ap.add_argument("--critic-from", type=Path, help="a trained Token Critic folder for this run (optional)")
    ap.add_argument("--slice-stride", type=int, default=16)
    ap.add_argument("--calibration-stride", type=int, default=8, help="restore every K-th hold-out slice")
    ap.add_argument("--max-cases", type=int)
    ap.add_argument("--data-name", default="demo", help="diagnose: suffix of the output file")
    ap.add_argument("--methods", help="comma-separated subset (default: every method the run copy has)")
    args = ap.parse_args()
    if args.what == "md":
        return markdown()
    if args.run is None or args.data is None:
        ap.error("--run and --data are required")
    if args.what == "ablation":
        ablation(args)
    elif args.what == "diagnose":
        diagnose(args)
    else:
        tables(args, f"eval_{args.what}.json")


if __name__ == "__main__":
    main()
