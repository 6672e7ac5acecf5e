"""Speed of the restoration loop, measured side by side in one run (what `mimood-bench` prints).

For every backend/precision available here, on the same batch of B real slices, R restorations, T iterations:

    torch fp32 eager     the reference: a plain eager `TorchEngine`, on a GPU too (no CUDA graphs)
    torch bf16 eager     CPU autocast to bfloat16 (AVX-512 BF16 / AMX kernels through oneDNN)
    torch fp16           GPU: the runtime's CUDA-graph engine under fp16 autocast
    ort fp32 / fp16      onnxruntime, CPU provider (fp32 runs the fused-attention `.ort` graphs) or CUDA
    ort int8             onnxruntime CPU, the ATD and MVTM step in their int8 copies (`mimood-export --int8`)
    trt fp32 / fp16      TensorRT engines (GPU with tensorrt)

we report
- seconds per batch for the whole loop (encode, T x (ATD + MVTM step), decode + score; the early stop is off,
  so every path computes the same maps; the onnxruntime CPU paths skip the rows whose result cannot change,
  `mimood.runtime.ort`, which is part of what they gain): one warm-up each, then the median of `repeats`
  rounds in which every path restores the batch once (interleaved, so a machine shared with other jobs loads
  them alike), device-synchronised, and where the time goes (per stage; "host" is the loop's own work between the
  stages: noise, thresholds);
- slices per second, and for the reference and the fastest path `mimood-infer` runs, the end-to-end time of
  one 155-slice volume through `infer_folder` (NIfTI read, preprocessing, restoration, map/mask/PNG writes);
- FLOPs per batch (counted by `torch.utils.flop_counter` on the loop's modules), achieved FLOP/s and the
  share of the machine's peak, measured in the same run with a large matmul in the path's precision.
A path that cannot run here is listed as skipped with the reason, never timed on something else.

AR restoration (the paper's baseline) is timed on the same batch with the same VQ-VAE, in torch fp32 eager
like the reference: the published procedure makes one full forward pass per raster position (400 per
batch); it is timed over the first `ar_positions` positions and scaled to 400 (every pass has the same
shapes, so the cost per position is constant), plus encode and decode. The exact fast variant (a pass only
after a row resampled something; `mimood.eval.baselines.ar_restore`) is timed whole on the same tokens.

Ratios: `runtime_vs_torch_eager` = reference seconds / seconds of the fastest path `mimood-infer` can run
(the lean runtime: ort, trt, torch CUDA graphs), the median of the per-round ratios (`runtime_ratio`);
`mimood_vs_ar` = AR seconds / reference seconds (same framework and precision, as in the paper's
comparison), the reference timed again just before and after AR (the mean of the two), so the ratio is side
by side too.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from mimood.config import NUM_TOKENS, RunConfig, preset as make_preset
from mimood.restore import restore
from mimood.runtime.torch_backend import TorchEngine

REFERENCE = "torch fp32 eager"
STAGES = ("encode", "detect", "mvtm_step", "decode_score")


@dataclass
class Result:
    path: str                                   # e.g. "ort fp32 cpu"
    engine: str                                 # the engine's own description (providers, fused graphs)
    seconds_per_batch: float                    # median, whole loop
    seconds_all: list[float]                    # every repeat (warm-up excluded)
    slices_per_second: float
    stages: dict[str, float]                    # median seconds per stage within a batch (+ "host")
    flops_per_batch: float
    achieved_flops: float                       # FLOP/s
    peak_share: float                           # achieved / the measured peak of this precision
    volume_seconds: float | None = None         # one volume end to end, NIfTI read/write included
    note: str = ""


@dataclass
class Bench:
    machine: dict[str, Any]
    settings: dict[str, Any]
    results: list[Result] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)   # {"path", "reason"}
    ar: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"machine": self.machine, "settings": self.settings,
                "results": [asdict(r) for r in self.results], "skipped": self.skipped, "ar": self.ar,
                "ratios": self.ratios}


# -- machine ------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def machine_info(device: str) -> dict[str, Any]:
    import onnxruntime as ort
    info = {"platform": platform.platform(), "cpu": _cpu_name(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "device": device, "load_average": _load()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def _load() -> float | None:
    """The 1-minute load average: how busy the (possibly shared) machine was."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_flops(device: str, dtype: torch.dtype, n: int | None = None, repeats: int = 3) -> float:
    """FLOP/s of a large square matmul: the machine's practical peak for that dtype."""
    n = n or (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = _timed(lambda: torch.mm(a, b), device, repeats)
    return 2 * n ** 3 / statistics.median(times)


def _timed(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


# -- what is timed ------------------------------------------------------------------------------------------
class StageTimer:
    """Wraps an engine and adds the (device-synchronised) time of each loop stage."""

    def __init__(self, engine, device: str):
        self.engine, self.device = engine, device
        self.seconds = dict.fromkeys(STAGES, 0.0)

    def __getattr__(self, name):
        attr = getattr(self.engine, name)
        if name not in STAGES:
            return attr

        def timed(*args):
            _sync(self.device)
            t = time.perf_counter()
            out = attr(*args)
            _sync(self.device)
            self.seconds[name] += time.perf_counter() - t
            return out
        return timed


def loop_flops(engine: TorchEngine, x: np.ndarray, T: int) -> float:
    """FLOPs of one batch: encode + T x (ATD + MVTM step) + decode/score, counted on the torch modules
    (the MVTM step runs the whole transformer whatever the mask, so every iteration costs the same)."""
    xd = engine.put(x.astype(np.float32))
    with torch.no_grad():
        enc = _count(lambda: engine.encoder(xd))
        tok = engine.repeat(engine.encoder(xd))                               # [B*R, N]
        mask = torch.ones_like(tok, dtype=torch.bool)
        noise = torch.rand(tok.shape, device=tok.device)
        det = _count(lambda: engine.detector(tok))
        step = _count(lambda: engine.sampler(tok, mask, noise))
        dec = _count(lambda: engine.scorer(tok, xd))
    return enc + T * (det + step) + dec


def _cpu_sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


# FlopCounterMode knows the GPU attention kernels but not the CPU one that scaled_dot_product_attention
# dispatches to here; without this entry the attention (about half of a transformer pass at N = 400, width 64)
# would count as free.
_EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def _count(fn) -> float:
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) as counter:
        fn()
    return float(counter.get_total_flops())


def time_batch(engine, x: np.ndarray, cfg, device: str) -> tuple[float, dict[str, float]]:
    """One batch through the whole loop (all T iterations): seconds, and seconds per stage (+ "host", the
    loop's own work between the stages)."""
    timer = StageTimer(engine, device)
    _sync(device)
    t = time.perf_counter()
    restore(timer, x, cfg, rng=np.random.default_rng(0), early_stop=False)
    _sync(device)
    total = time.perf_counter() - t
    return total, {**timer.seconds, "host": total - sum(timer.seconds.values())}


def time_paths(engines: dict[str, Any], x: np.ndarray, cfg, device: str, repeats: int,
               say: Callable[[str], None] = print) -> dict[str, tuple[list[float], dict[str, float]]]:
    """Seconds per batch of every engine and its median stage times: one warm-up batch each, then `repeats`
    rounds in which every engine restores the batch once. Interleaving the engines round by round keeps
    their ratios fair on a machine whose load changes while it measures."""
    runs: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name in engines}
    for name, engine in engines.items():
        t, _ = time_batch(engine, x, cfg, device)
        say(f"  warm-up {name}: {t:.2f} s")
    for i in range(repeats):
        for name, engine in engines.items():
            runs[name].append(time_batch(engine, x, cfg, device))
        say(f"  round {i + 1}/{repeats}: " + ", ".join(f"{n} {r[-1][0]:.2f} s" for n, r in runs.items()))
    return {name: ([t for t, _ in r], {k: statistics.median(st[k] for _, st in r) for k in STAGES + ("host",)})
            for name, r in runs.items()}


def time_ar(vqvae, ar, x: np.ndarray, cfg, device: str, positions: int,
            say: Callable[[str], None] = print) -> dict[str, Any]:
    """AR restoration on the same batch (module docstring): the paper's procedure, `positions` of its 400
    passes timed and scaled, and the exact fast variant timed whole; each plus encode and decode."""
    from mimood.eval.baselines import ar_restore, ar_restore_reference
    from mimood.models.graphs import DecodeScore, EncodeGraph

    enc = EncodeGraph(vqvae).to(device).eval()
    dec = DecodeScore(vqvae, cfg.R, cfg.min_pool, cfg.avg_pool, cfg.residual).to(device).eval()
    ar = ar.to(device).eval()
    xd = torch.from_numpy(x.astype(np.float32)).to(device)
    with torch.no_grad():
        tokens = enc(xd).repeat_interleave(cfg.R, 0)                       # [B*R, N]
        noise = torch.from_numpy(np.random.default_rng(0).random(tuple(tokens.shape), dtype=np.float32)).to(device)
        t_enc = statistics.median(_timed(lambda: enc(xd), device, 3))
        t_dec = statistics.median(_timed(lambda: dec(tokens, xd), device, 3))
        t_part = _timed(lambda: ar_restore_reference(ar, tokens, noise, cfg.lam_nll, positions=positions),
                        device, 1, warmup=0)[0]
        say(f"  AR reference: {positions} passes in {t_part:.1f} s -> {t_part * NUM_TOKENS / positions:.1f} s "
            f"for {NUM_TOKENS}; now the exact fast variant ...")
        passes = []
        t_fast = _timed(lambda: passes.append(ar_restore(ar, tokens, noise, cfg.lam_nll)[1]), device, 1,
                        warmup=0)[0]
    return {"seconds_per_batch": t_enc + t_part * NUM_TOKENS / positions + t_dec,
            "positions_timed": positions, "passes": NUM_TOKENS, "encode_seconds": t_enc, "decode_seconds": t_dec,
            "fast_seconds_per_batch": t_enc + t_fast + t_dec, "fast_passes": passes[0],
            "lam_nll": cfg.lam_nll, "engine": f"torch fp32 eager {device}"}


def bench_slices(n: int, volume: str | Path | None = None, data=None) -> np.ndarray:
    """n real slices [n,1,160,160], central brain slices: of the shipped MNI152 T2 template, or of `volume` (a
    NIfTI scan, preprocessed with the export's data config `data`). The onnxruntime CPU paths skip rows that
    settle (mimood.runtime.ort), so their time depends on the slices: a healthy template settles after one or
    two iterations, a scan with a lesion keeps rows masked longer."""
    from mimood.config import DataConfig
    from mimood.data.demo import load_template
    from mimood.data.preprocess import preprocess

    s = preprocess(load_template() if volume is None else volume, data or DataConfig())
    mid = len(s.images) // 2
    idx = np.arange(mid - n // 2, mid - n // 2 + n) % len(s.images)
    return s.images[idx][:, None].astype(np.float32)


def volume_for_timing(out: Path) -> Path:
    """A 155-slice volume: a BraTS 2018 case when ../shared is beside the repo, else the template cut to 155
    axial slices (the time depends on the number of slices with brain, which the result states)."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "lesion"
    case = shared / "brats18_cbica_ame_1_t2.nii.gz"
    if case.exists():
        return case
    import nibabel as nib
    from mimood.data.demo import load_template
    img = load_template()
    z0 = (img.shape[2] - 155) // 2
    path = out / "template_155.nii.gz"
    nib.save(img.slicer[:, :, z0:z0 + 155], str(path))
    return path


def random_run(cfg: RunConfig, folder: Path) -> Path:
    """A run folder with random-weight models of `cfg` (the loop's speed does not depend on the weights)."""
    from mimood.models.checkpoint import build_model, save_model
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save(folder / "config.json")
    for kind in ("vqvae", "atd", "mvtm", "ar"):
        model = build_model(kind, cfg.vqvae if kind == "vqvae" else cfg.transformer)
        (folder / kind).mkdir(exist_ok=True)
        save_model(model, folder / kind / "best.safetensors", kind, {"random": True})
    return folder


# -- which paths ----------------------------------------------------------------------------------------------
# (backend, precision, what runs it); the first is the reference and is always timed
PATHS = (("torch", "fp32"), ("torch", "bf16"), ("torch", "fp16"), ("ort", "fp32"), ("ort", "fp16"),
         ("ort", "int8"), ("trt", "fp32"), ("trt", "fp16"))


def plan_paths(device: str, wanted: list[str] | None = None) -> tuple[list[tuple[str, str]], list[dict]]:
    """The (backend, precision) pairs to time here, and the ones that cannot run here with the reason.
    wanted: backend names ("ort") or backend-precision pairs ("ort-fp16") to time among those that can run;
    the reference is always timed."""
    import onnxruntime as ort

    from mimood.runtime.trt import trt_available
    gpu = device.startswith("cuda")
    trt_ok, trt_why = trt_available()
    ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    run, skipped = [], []
    for backend, precision in PATHS:
        name = f"{backend} {precision}"
        reason = None
        if backend == "torch" and precision == "bf16" and gpu:
            reason = "GPU half precision is timed as torch fp16 (CUDA graphs)"
        elif backend == "torch" and precision == "fp16" and not gpu:
            reason = "no CUDA GPU (torch fp16 = CUDA graphs under fp16 autocast)"
        elif backend == "ort" and precision == "int8" and gpu:
            reason = "int8 graphs run on onnxruntime's CPU provider only (timed without a GPU)"
        elif backend == "ort" and gpu and not ort_cuda:
            reason = "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
        elif backend == "trt" and not trt_ok:
            reason = trt_why
        if reason:
            skipped.append({"path": name, "reason": reason})
        elif (backend, precision) == ("torch", "fp32") or not wanted or backend in wanted \
                or f"{backend}-{precision}" in wanted:
            run.append((backend, precision))
    if not gpu:
        skipped.append({"path": "ort fp32/fp16 CUDA", "reason": "no CUDA GPU"})
    return run, skipped


def make_engine(bundle, backend: str, precision: str, device: str):
    """The engine of a path. torch fp32 is always the plain eager reference (on a GPU too); torch bf16 is
    the eager engine under CPU bf16 autocast; the others are what `mimood-infer` loads."""
    from mimood.runtime.infer import load_engine
    if backend == "torch" and precision in ("fp32", "bf16"):
        from mimood.runtime.torch_backend import load_torch_engine
        engine = load_torch_engine(bundle, precision, device, cuda_graphs=False)
        engine.bundle = bundle
        return engine
    return load_engine(bundle, backend, precision, device)


# -- the benchmark --------------------------------------------------------------------------------------------
def run_bench(run: str | Path | None = None, preset: str = "cpu", backends: list[str] | None = None,
              R: int | None = None, T: int | None = None, batch: int = 32, repeats: int = 3,
              ar_positions: int = 40, volume: bool = True, device: str | None = None,
              slices: str | Path | None = None,
              say: Callable[[str], None] = print, saved: Callable[[Bench], None] | None = None) -> Bench:
    """Time every available path (module docstring); `say` gets the progress lines, `saved` the results so
    far after each part (so a run stopped during the long AR timing keeps what it measured)."""
    saved = saved or (lambda bench: None)
    from mimood.export.export import export_run
    from mimood.runtime.bundle import Bundle
    from mimood.runtime.infer import infer_folder

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="mimood-bench-"))
    if run is None:
        run = random_run(make_preset(preset), work / "run")
        source = f"random weights, preset {preset}"
    else:
        source = f"run {run}"
    run = Path(run)
    cfg = RunConfig.load(run / "config.json")
    R, T = R or cfg.restore.R, cfg.restore.T if T is None else T
    paths, skipped = plan_paths(device, backends)
    say(f"exporting {source} for batch {batch} x R {R} ...")
    export = work / "export"
    export_run(run, export, batch=batch, fp16=any(p == "fp16" for b, p in paths if b != "torch"), R=R, T=T,
               validate=False, build_engines=any(b == "trt" for b, _ in paths), progress=False,
               int8=("ort", "int8") in paths)        # unvalidated: int8 calibrated, timed, not map-checked
    bundle = Bundle.open(export)
    rcfg = replace(bundle.restore_config(), R=R, T=T)
    x = bench_slices(batch, slices, bundle.data_config() if slices is not None else None)
    bench = Bench(machine_info(device), {"source": source, "preset": cfg.preset, "batch": batch, "R": R, "T": T,
                                         "repeats": repeats, "warmup": 1, "ar_positions": ar_positions,
                                         "early_stop": False,
                                         "slices": f"{Path(slices).name if slices else 'MNI152 T2 template'}, "
                                                   "central slices"},
                  skipped=skipped)
    say("measuring the peak (large matmul) ...")
    peaks = {"fp32": peak_flops(device, torch.float32), "bf16": peak_flops(device, torch.bfloat16)}
    if device.startswith("cuda"):
        peaks["fp16"] = peak_flops(device, torch.float16)
    bench.machine["peak_flops"] = peaks
    say("peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))

    engines = {}
    for backend, precision in paths:
        name = f"{backend} {precision} {device}" + (" eager" if backend == "torch" and precision != "fp16" else "")
        try:
            engines[name] = make_engine(bundle, backend, precision, device)
        except (RuntimeError, ValueError, ImportError) as e:               # a provider or library that fails here
            bench.skipped.append({"path": name, "reason": f"could not load: {e}"})
            say(f"skipped {name}: {e}")
    flops = loop_flops(next(iter(engines.values())), x, T)                   # on the reference's modules
    say(f"timing {', '.join(engines)}: a warm-up each, then {repeats} rounds (one batch per path per round) ...")
    for name, (times, stages) in time_paths(engines, x, rcfg, device, repeats, say).items():
        med = statistics.median(times)
        precision = name.split()[1]
        peak = peaks.get(precision, peaks["fp32"])
        note = "" if precision in peaks else f"peak share against the fp32 peak (no {precision} matmul peak here)"
        if getattr(engines[name], "skips_rows", False):
            note = "; ".join(filter(None, [note, "FLOP/s of the full computation: settled and duplicate rows "
                                                 "skipped, so less work was done"]))
        bench.results.append(Result(name, engines[name].detail, med, times, batch / med, stages, flops,
                                    flops / med, flops / med / peak, note=note))
    reference = engines[bench.results[0].path]
    del engines
    saved(bench)

    ref = bench.results[0]
    lean = bench.results[1:]                 # every other path timed here is one `mimood-infer` can run
    if lean:
        best = min(lean, key=lambda r: r.seconds_per_batch)
        bench.ratios.update(runtime_ratio(ref, best))
    if volume:
        vol_dir = work / "volume"
        vol_dir.mkdir()
        vol = volume_for_timing(vol_dir)
        if vol.parent != vol_dir:
            (vol_dir / vol.name).symlink_to(vol)
        bench.settings["volume"] = str(vol)
        for r in [ref] + ([best] if lean else []):
            backend, precision = r.path.split()[:2]
            say(f"timing one volume ({vol.name}) end to end with {r.path} ...")
            t = time.perf_counter()
            report = infer_folder(vol_dir, work / f"out-{backend}-{precision}", export, backend, precision,
                                  progress=False)
            r.volume_seconds = time.perf_counter() - t
            row = report.rows[0]
            if row.status != "ok":
                raise RuntimeError(f"volume timing failed: {row.error}")
            r.note = "; ".join(filter(None, [r.note, f"volume: {row.slices} slices with brain, "
                                                        f"{report.backend}"]))
            say(f"  {r.volume_seconds:.1f} s ({row.slices} slices)")
            saved(bench)

    if (run / "ar" / "best.safetensors").is_file():
        from mimood.models.checkpoint import load_model
        say(f"timing AR restoration (paper procedure: {ar_positions} of {NUM_TOKENS} passes, scaled) ...")
        vq = load_model(bundle.weights("vqvae"), device)[0]
        ar = load_model(run / "ar" / "best.safetensors", device)[0]
        before = time_batch(reference, x, rcfg, device)[0]          # the reference again, around AR: side by side
        bench.ar = time_ar(vq, ar, x, rcfg, device, ar_positions, say)
        bench.ar["reference_seconds_around"] = [before, time_batch(reference, x, rcfg, device)[0]]
        around = statistics.mean(bench.ar["reference_seconds_around"])
        bench.ratios["mimood_vs_ar"] = bench.ar["seconds_per_batch"] / around
        bench.ratios["mimood_vs_ar_fast"] = bench.ar["fast_seconds_per_batch"] / around
    else:
        bench.skipped.append({"path": "AR restoration", "reason": f"{run} has no ar/best.safetensors"})
    bench.machine["load_average_end"] = _load()
    return bench


def runtime_ratio(ref: Result, best: Result) -> dict[str, Any]:
    """`runtime_vs_torch_eager`: the median over the interleaved rounds of reference seconds / best-path
    seconds. A ratio within a round compares two batches run back to back, so it moves far less with the
    machine's load than the ratio of the two medians (which may come from different rounds)."""
    rounds = [a / b for a, b in zip(ref.seconds_all, best.seconds_all)]
    return {"runtime_vs_torch_eager": statistics.median(rounds), "runtime_best_path": best.path,
            "runtime_vs_torch_eager_rounds": rounds}


def format_table(bench: Bench) -> str:
    m, st = bench.machine, bench.settings
    lines = [f"machine: {m.get('gpu', m['cpu'])} ({m['cores']} cores, {m['torch_threads']} torch threads), "
             f"torch {m['torch']}, onnxruntime {m['onnxruntime']}; measured peak "
             + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in m["peak_flops"].items()),
             f"batch {st['batch']} slices x R {st['R']}, T {st['T']} (all iterations), {st['source']}; "
             f"slices: {st['slices']}; median of {st['repeats']} interleaved rounds after a warm-up; load average "
             f"{m['load_average']} at the start, {m.get('load_average_end')} at the end",
             "",
             f"{'path':<24}{'s/batch':>9}{'slices/s':>10}{'vs ref':>8}{'GFLOP/s':>9}{'% peak':>8}"
             f"{'volume s':>10}  stages s (encode / detect / mvtm_step / decode_score / host)"]
    ref = bench.results[0].seconds_all if bench.results else None
    for r in bench.results:                                  # vs ref: median of the per-round ratios
        stages = " / ".join(f"{r.stages[k]:.2f}" for k in STAGES + ("host",))
        vol = f"{r.volume_seconds:.1f}" if r.volume_seconds is not None else "-"
        lines.append(f"{r.path:<24}{r.seconds_per_batch:>9.2f}{r.slices_per_second:>10.2f}"
                     f"{statistics.median(a / b for a, b in zip(ref, r.seconds_all)):>7.2f}x"
                     f"{r.achieved_flops / 1e9:>9.1f}{100 * r.peak_share:>7.1f}%"
                     f"{vol:>10}  {stages}")
    if bench.results:
        lines.append(f"FLOPs per batch: {bench.results[0].flops_per_batch / 1e9:.1f} GFLOP")
    for r in bench.results:
        if r.note:
            lines.append(f"{r.path}: {r.note}")
    for s in bench.skipped:
        lines.append(f"skipped {s['path']}: {s['reason']}")
    if bench.ar:
        a = bench.ar
        lines += ["", f"AR restoration ({a['engine']}): {a['seconds_per_batch']:.1f} s per batch (paper procedure, "
                      f"{a['passes']} forward passes; {a['positions_timed']} timed and scaled); exact fast variant "
                      f"{a['fast_seconds_per_batch']:.1f} s ({a['fast_passes']} passes)"]
    lines.append("")
    for k, v in bench.ratios.items():
        if isinstance(v, list):
            v = ", ".join(f"{x:.2f}" for x in v)
        lines.append(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    return "\n".join(lines)


def save_json(bench: Bench, path: str | Path) -> None:
    from mimood.contract import atomic_write
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(bench.to_json(), indent=2) + "\n")
