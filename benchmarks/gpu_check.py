"""The GPU check (issue 14): the restoration loop of the `paper` preset with random weights on one CUDA GPU, in
every torch form the runtime has or could have, timed in one run, with the CUDA-graph maps checked against eager.

    python benchmarks/gpu_check.py                    # paper preset, batch 32 x R 4, T 8: results/gpu_<card>.json
    python benchmarks/gpu_check.py --dry-run --out X  # tiny preset, batch 2 x R 2, T 2, on the CPU: is it wired?

Run through `benchmarks/gpu_check.sh`, which installs the missing pure-python wheels first (its header).

Paths (all iterations: the early stop is off, so every path does the same work; the same slices and the same
host noise for every path):
    torch {fp32, fp16, bf16} eager        mimood.runtime.torch_backend.TorchEngine (autocast for fp16/bf16)
    torch {fp32, fp16, bf16} cuda-graphs  CudaGraphEngine: ATD and MVTM step replayed from CUDA graphs
    torch {fp16, fp32} compile            TorchEngine with its four modules wrapped by torch.compile (inductor,
                                          `--compile-mode`; its compile time is the warm-up's)
Each path: one warm-up batch (CUDA-graph capture or compilation), then `--repeats` batches, device-synchronised;
the median is "seconds per 32 slices" (per `--batch` slices, scaled to 32). The paper reports 9.5 s per 32 slices
on an RTX 3090 for MIM-OOD; `vs_paper` = 9.5 / ours. Paths run one after the other (a dedicated GPU, not the
interleaved rounds `mimood-bench` needs on a shared CPU); a path that would start after `--budget` seconds is
listed as skipped, never guessed.

Checks: the maps of `torch fp32 cuda-graphs` against `torch fp32 eager`, and of `torch fp16 cuda-graphs` against
`torch fp16 eager` (same kernels replayed, same noise): max |diff| <= 1e-3 (the tolerance of
tests/test_runtime.py's CUDA-graph test) and mean |diff| <= 1e-5. Every other path's distance from the eager
map of its precision is recorded, not judged. Exit status 1 when a check fails (the JSON is written anyway).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))          # the repository's mimood, uninstalled

from mimood.bench import loop_flops, peak_flops, time_batch           # noqa: E402
from mimood.config import IMAGE_SIZE, preset                          # noqa: E402
from mimood.contract import atomic_write                              # noqa: E402
from mimood.models.checkpoint import build_model                      # noqa: E402
from mimood.restore import restore                                    # noqa: E402
from mimood.runtime.torch_backend import CudaGraphEngine, TorchEngine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PAPER = {"seconds_per_32_slices": 9.5, "gpu": "NVIDIA GeForce RTX 3090", "method": "MIM-OOD"}
TOLERANCE = {"max_abs": 1e-3, "mean_abs": 1e-5}
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
PATHS = [("eager", "fp32"), ("cuda-graphs", "fp32"), ("eager", "fp16"), ("cuda-graphs", "fp16"), ("eager", "bf16"),
         ("cuda-graphs", "bf16"), ("compile", "fp16"), ("compile", "fp32")]
CHECKED = {("cuda-graphs", "fp32"), ("cuda-graphs", "fp16")}


def brain_slices(n: int, seed: int = 0) -> np.ndarray:
    """n brain-like slices [n, 1, H, W] in [0, 1]: textured ellipses of varied size, background 0 (no NIfTI
    reader needed: the GPU machine has no nibabel; the loop's speed does not depend on the content)."""
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE] - IMAGE_SIZE / 2) / (IMAGE_SIZE / 2)
    out = np.zeros((n, 1, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for i in range(n):
        a, b = rng.uniform(0.55, 0.85, 2)
        inside = (yy / a) ** 2 + (xx / b) ** 2 <= 1
        tissue = 0.5 + 0.25 * np.sin(7 * xx + rng.uniform(0, 6)) * np.cos(5 * yy) + 0.1 * rng.standard_normal(xx.shape)
        out[i, 0] = np.where(inside, np.clip(tissue, 0.05, 1.0), 0.0)
    return out


def make_engine(kind: str, precision: str, models: dict, cfg, device: str, compile_mode: str, compile_backend: str):
    autocast = DTYPES[precision]
    if kind == "cuda-graphs":
        return CudaGraphEngine(models["vqvae"], models["atd"], models["mvtm"], cfg, device=device, autocast=autocast)
    engine = TorchEngine(models["vqvae"], models["atd"], models["mvtm"], cfg, device=device, autocast=autocast)
    if kind == "compile":
        for name in ("encoder", "detector", "sampler", "scorer"):
            options = {"backend": compile_backend, "dynamic": False}
            if compile_backend == "inductor":
                options["mode"] = compile_mode
            setattr(engine, name, torch.compile(getattr(engine, name), **options))
    return engine


def why_not(kind: str, precision: str, device: str) -> str | None:
    """Why a path cannot run here, or None."""
    gpu = device.startswith("cuda")
    if kind == "cuda-graphs" and not gpu:
        return "no CUDA GPU (CUDA graphs)"
    if precision == "fp16" and not gpu:
        return "no CUDA GPU (fp16 autocast is a GPU path)"
    if precision == "bf16" and gpu and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    return None


def versions(device: str) -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    for pkg in ("triton", "numpy", "monai", "mimood"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed" if pkg != "mimood" else "repository checkout"
    if device.startswith("cuda"):
        out["driver"] = _driver()
    return out


def _driver() -> str | None:
    try:
        import subprocess
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def card_slug(name: str) -> str:
    """"NVIDIA H200" -> "nvidia_h200" (the results file name)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unknown"


def run(args, save=lambda out: None) -> tuple[dict, bool]:
    """Time every path (module docstring); `save` gets the results so far after each path."""
    t_start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = preset(args.preset)
    rcfg = replace(cfg.restore, R=args.R, T=args.T, batch=args.batch)
    torch.manual_seed(0)
    models = {k: build_model(k, cfg.vqvae if k == "vqvae" else cfg.transformer).to(device).eval()
              for k in ("vqvae", "atd", "mvtm")}
    x = brain_slices(args.batch)
    card = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    say = print if not args.quiet else (lambda *a, **k: None)
    say(f"{card}: preset {args.preset}, batch {args.batch} x R {args.R}, T {args.T}, {args.repeats} repeats")
    machine = {"card": card, "device": device, "platform": platform.platform()}
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        machine.update(compute_capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                       multiprocessors=p.multi_processor_count)
    out = {"card": card, "machine": machine, "versions": versions(device),
           "settings": {"preset": args.preset, "weights": "random (torch.manual_seed(0))", "batch": args.batch,
                        "R": args.R, "T": args.T, "early_stop": False, "repeats": args.repeats, "warmup": 1,
                        "slices": "synthetic brain-like ellipses (benchmarks/gpu_check.py brain_slices)",
                        "noise": "host numpy generator, seed 0, the same for every path",
                        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                        "compile_mode": args.compile_mode, "compile_backend": args.compile_backend,
                        "budget_seconds": args.budget, "dry_run": args.dry_run},
           "paper": PAPER, "results": [], "checks": [], "skipped": []}
    with torch.no_grad():
        peaks = {p: peak_flops(device, dtype or torch.float32, n=None if not args.dry_run else 256)
                 for p, dtype in DTYPES.items() if why_not("eager", p, device) is None}
    out["machine"]["peak_flops"] = peaks
    flops = None
    maps: dict[tuple[str, str], np.ndarray] = {}
    ok = True
    for kind, precision in PATHS:
        name = f"torch {precision} {kind}"
        reason = why_not(kind, precision, device)
        if reason is None and kind == "compile" and args.no_compile:
            reason = "--no-compile"
        elapsed = time.perf_counter() - t_start
        if reason is None and elapsed > args.budget:
            reason = f"time budget: {elapsed:.0f} s > {args.budget:.0f} s before it would start"
        if reason:
            out["skipped"].append({"path": name, "reason": reason})
            say(f"skipped {name}: {reason}")
            continue
        engine = make_engine(kind, precision, models, rcfg, device, args.compile_mode, args.compile_backend)
        if flops is None:
            flops = loop_flops(engine, x, args.T)
        t0 = time.perf_counter()
        restored = restore(engine, x, rcfg, rng=np.random.default_rng(0), early_stop=False)  # warm-up + maps
        _sync(device)
        warmup = time.perf_counter() - t0
        maps[kind, precision] = restored.maps
        runs = [time_batch(engine, x, rcfg, device) for _ in range(args.repeats)]
        seconds = [t for t, _ in runs]
        med = statistics.median(seconds)
        stages = {k: statistics.median(st[k] for _, st in runs) for k in runs[0][1]}
        per32 = med * 32 / args.batch
        ref = maps.get(("eager", precision))
        diff = np.abs(restored.maps.astype(np.float64) - ref) if ref is not None else None
        r = {"path": name, "seconds_per_batch": med, "seconds_per_32_slices": per32, "seconds_all": seconds,
             "warmup_seconds": warmup, "stages": stages, "slices_per_second": args.batch / med,
             "achieved_flops": flops / med, "peak_share": flops / med / peaks.get(precision, peaks["fp32"]),
             "vs_paper": PAPER["seconds_per_32_slices"] / per32,
             "maps_vs_eager": None if diff is None or kind == "eager" else
             {"reference": f"torch {precision} eager", "max_abs": float(diff.max()), "mean_abs": float(diff.mean())}}
        out["results"].append(r)
        say(f"{name}: {med:.4f} s per batch ({per32:.4f} s per 32 slices, warm-up {warmup:.1f} s)")
        if (kind, precision) in CHECKED and diff is not None:
            passed = bool(diff.max() <= TOLERANCE["max_abs"] and diff.mean() <= TOLERANCE["mean_abs"])
            ok &= passed
            out["checks"].append({"name": f"{name} maps == torch {precision} eager maps", "passed": passed,
                                  "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                                  "tolerance": TOLERANCE})
            say(f"  check vs eager: max |diff| {diff.max():.2e}, mean {diff.mean():.2e}: "
                + ("ok" if passed else "FAILED"))
        del engine
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        out["flops_per_batch"], out["seconds_total"] = flops, time.perf_counter() - t_start
        save(out)
    out["flops_per_batch"] = flops
    eager = next((r for r in out["results"] if r["path"] == "torch fp32 eager"), None)
    for r in out["results"]:
        r["vs_eager_fp32"] = eager["seconds_per_batch"] / r["seconds_per_batch"] if eager else None
    if out["results"]:
        best = min(out["results"], key=lambda r: r["seconds_per_batch"])
        out["fastest"] = {"path": best["path"], "seconds_per_32_slices": best["seconds_per_32_slices"],
                          "vs_paper": best["vs_paper"]}
    out["seconds_total"] = time.perf_counter() - t_start
    return out, ok


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny preset, batch 2 x R 2, T 2, 1 repeat, CPU unless --device, compile with the 'eager' "
                         "backend: checks the script, measures nothing")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("-R", "--R", dest="R", type=int, default=4)
    ap.add_argument("-T", "--T", dest="T", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode (inductor)")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--budget", type=float, default=300.0,
                    help="seconds after which no further path starts (the script must end within 8 minutes)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: benchmarks/results/gpu_<card>.json (--dry-run: /tmp/gpu_check_dry_run.json)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.preset, args.batch, args.R, args.T, args.repeats = "tiny", 2, 2, 2, 1
        args.device = args.device or "cpu"
        args.compile_backend = "eager"
    def save(out: dict) -> Path:
        path = args.out or (Path("/tmp/gpu_check_dry_run.json") if args.dry_run
                            else RESULTS / f"gpu_{card_slug(out['card'])}.json")
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(out, indent=2) + "\n")
        return path

    out, ok = run(args, save)
    path = save(out)
    print(f"wrote {path} ({out['seconds_total']:.0f} s)" + ("" if ok else "; a CUDA-graph check FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
