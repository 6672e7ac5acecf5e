"""The transformer loop graphs (ATD, MVTM step) in onnxruntime on the CPU, side by side with torch eager:
which ONNX form of attention, and which session options, run fastest.

    python benchmarks/ort_attention.py [--run /work/runs/cpu1] [--preset cpu] [--reps 5] [--out bench.json]
    python benchmarks/ort_attention.py --run RUN --loop EXPORT [--reps 3]     # the whole restoration loop

Graph forms (each exported from the same module, checked against it, then timed):
    standard-opset20   atd.onnx / mvtm_step.onnx as mimood-export writes them (MatMul + Softmax + MatMul)
    standard-opset23   the same module at opset 23, where the exporter emits the standard `Attention` op
    onnxscript-all     onnxscript's `optimize_for_ort` (attention -> MultiHeadAttention, SkipLayerNorm, BiasGelu)
    ort-copy           `mimood.export.graphs.export_ort` (the atd.ort.onnx / mvtm_step.ort.onnx mimood-export writes)
and the ort-copy under other session options (one intra-op thread, no spinning, ORT_ENABLE_EXTENDED).

Two timings per form, interleaved with torch eager in the same process (medians of --reps calls):
    wall   all cores (torch's and onnxruntime's default thread counts): what a user sees, but it moves with
           whatever else runs on the machine;
    cpu1   one thread, CPU time of the calling thread (`time.thread_time`): the work itself, hardly moved by
           other processes on a shared machine (both libraries run single-threaded work on the caller).
Models: the run's best ATD and MVTM checkpoints with --run, else random weights of --preset (every parameter
moved off its initial value, so no bias is zero and no LayerNorm is the identity).

--loop EXPORT times `mimood.restore.restore` on one batch of the run's validation slices (encode, T x (ATD +
MVTM step), decode, as exported: the manifest's batch, R and T) with torch eager (`TorchEngine`) and with
onnxruntime on the export's graphs: the standard ones, and the onnxruntime-only copies of the transformer
graphs (`extra.ort_graphs`), with the default session options and without spinning (wall clock, medians).
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from mimood.config import RunConfig, preset
from mimood.contract import Manifest
from mimood.export.export import TOLERANCES, check_graph, validation_slices
from mimood.export.graphs import GRAPHS, IO_NAMES, ORT_GRAPHS, example_inputs, export_onnx, export_ort
from mimood.models.checkpoint import build_model, load_model
from mimood.models.graphs import ATDGraph, MVTMStep
from mimood.restore import restore
from mimood.runtime.ort import OrtEngine
from mimood.runtime.torch_backend import TorchEngine

L = ort.GraphOptimizationLevel
SESSIONS = {  # name -> (intra-op threads for `wall` (0 = onnxruntime's default), config entries, level)
    "": (0, {}, L.ORT_ENABLE_ALL),
    " 1-thread": (1, {}, L.ORT_ENABLE_ALL),
    " no-spin": (0, {"session.intra_op.allow_spinning": "0"}, L.ORT_ENABLE_ALL),
    " extended": (0, {}, L.ORT_ENABLE_EXTENDED),
}


def modules(run: Path | None, preset_name: str) -> dict[str, torch.nn.Module]:
    if run is not None:
        atd, mvtm = (load_model(run / k / "best.safetensors")[0] for k in ("atd", "mvtm"))
    else:
        cfg = preset(preset_name).transformer
        torch.manual_seed(0)
        atd, mvtm = build_model("atd", cfg), build_model("mvtm", cfg)
        with torch.no_grad():
            for p in [*atd.parameters(), *mvtm.parameters()]:
                p.add_(0.05 * torch.randn_like(p))
    return {"atd": ATDGraph(atd).eval(), "mvtm_step": MVTMStep(mvtm).eval()}


def graph_forms(name: str, module, inputs, folder: Path) -> dict[str, Path]:
    from onnxscript import ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    forms = {f: folder / f"{name}.{f}.onnx" for f in ("standard-opset20", "standard-opset23", "onnxscript-all",
                                                      "ort-copy")}
    export_onnx(name, module, inputs, forms["standard-opset20"])
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(module, inputs, input_names=IO_NAMES[name][0], output_names=IO_NAMES[name][1],
                                    opset_version=23, dynamo=True, external_data=False, verbose=False)
    onnx.save(program.model_proto, forms["standard-opset23"])
    model, _ = optimize_for_ort(ir.load(str(forms["standard-opset20"])))
    ir.save(model, str(forms["onnxscript-all"]))
    export_ort(forms["standard-opset20"], forms["ort-copy"])
    return forms


def session(path: Path, threads: int, config: dict, level) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.graph_optimization_level = threads, level
    for k, v in config.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def timings(runners: dict, reps: int, clock) -> dict[str, float]:
    """Median ms per call of each runner, the runners interleaved rep by rep (after one warm-up call each)."""
    times = {k: [] for k in runners}
    for r in runners.values():
        r()
    for _ in range(reps):
        for k, r in runners.items():
            t = clock()
            r()
            times[k].append(clock() - t)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


@torch.no_grad()
def bench(name: str, module, folder: Path, reps: int, B: int, R: int) -> dict[str, dict[str, float]]:
    inputs = example_inputs(name, B, R, module.atd.cfg.vocab_size if name == "atd" else module.mvtm.cfg.vocab_size)
    feeds = dict(zip(IO_NAMES[name][0], (t.numpy() for t in inputs)))
    forms = graph_forms(name, module, inputs, folder)
    want = dict(zip(IO_NAMES[name][1], [module(*inputs).numpy()]))
    for form, path in forms.items():
        checks = check_graph(name, path, feeds, want, TOLERANCES["fp32"], lam=0.5)
        assert all(c.passed for c in checks), (form, [str(c) for c in checks])
    out = {}
    threads = torch.get_num_threads()
    for mode, clock in (("wall", time.perf_counter), ("cpu1", time.thread_time)):
        torch.set_num_threads(threads if mode == "wall" else 1)
        runners = {"torch eager": lambda: module(*inputs)}
        for form, path in forms.items():
            for suffix, (n, config, level) in SESSIONS.items():
                if suffix and (form != "ort-copy" or mode == "cpu1"):
                    continue                                        # session options: on the adopted form only
                s = session(path, n if mode == "wall" else 1, config, level)
                runners[form + suffix] = lambda s=s: s.run(None, feeds)
        out[mode] = timings(runners, reps, clock)
    torch.set_num_threads(threads)
    return out


class OrtLoopEngine(OrtEngine):
    """The runtime's `OrtEngine` over sessions built with this benchmark's options (threads, config entries)
    on an export folder's graph files."""

    def __init__(self, folder: Path, files: dict[str, str], threads: int, config: dict):
        self.name, self.R = "ort", Manifest.load(folder).R
        self.sessions = {g: session(folder / f, threads, config, L.ORT_ENABLE_ALL) for g, f in files.items()}


@torch.no_grad()
def bench_loop(run: Path, folder: Path, reps: int) -> dict[str, dict[str, float]]:
    m = Manifest.load(folder)
    cfg = replace(RunConfig.load(run / "config.json").restore, T=m.T, R=m.R, batch=m.batch, lam=m.lam)
    x = validation_slices(run, m.batch)[0].numpy()                          # [B, 1, H, W]
    standard = {g: m.graphs[g]["file"] for g in GRAPHS}
    ort_copies = {**standard, **{g: e.file for g, e in m.extra.ort_graphs.items()}}
    no_spin = {"session.intra_op.allow_spinning": "0"}
    torch_engine = TorchEngine.from_run(run, cfg)
    masked = restore(torch_engine, x, cfg, np.random.default_rng(0), lam=m.lam).masked
    print(f"loop: batch {m.batch}, R {m.R}, T {m.T}; masked tokens per iteration {masked}")
    out, threads = {}, torch.get_num_threads()
    for mode, clock in (("wall", time.perf_counter), ("cpu1", time.thread_time)):
        n = 0 if mode == "wall" else 1
        torch.set_num_threads(threads if mode == "wall" else 1)
        engines = {"torch eager": torch_engine,
                   "ort standard graphs": OrtLoopEngine(folder, standard, n, {}),
                   "ort .ort copies": OrtLoopEngine(folder, ort_copies, n, {})}
        if mode == "wall":
            engines["ort .ort copies no-spin"] = OrtLoopEngine(folder, ort_copies, n, no_spin)
        runners = {k: (lambda e=e: restore(e, x, cfg, np.random.default_rng(0), lam=m.lam))
                   for k, e in engines.items()}
        out[mode] = timings(runners, reps, clock)
    torch.set_num_threads(threads)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="run folder with atd/ and mvtm/ best checkpoints")
    ap.add_argument("--preset", default="cpu", help="model sizes when no --run is given")
    ap.add_argument("--batch", type=int, default=None, help="slices per batch (default: the preset's)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--loop", type=Path, default=None, help="export folder of --run: time the whole loop")
    args = ap.parse_args()
    if args.loop is not None:
        res = bench_loop(args.run, args.loop, args.reps)
        print(f"whole loop, median of {args.reps}, s (torch eager / x)")
        print(f"{'':26s} {'wall':>7s} {'ratio':>6s} {'cpu1':>7s} {'ratio':>6s}")
        for k, v in res["wall"].items():
            c = res["cpu1"].get(k)
            cpu1 = f"{c / 1e3:7.2f} {res['cpu1']['torch eager'] / c:6.2f}" if c else ""
            print(f"{k:26s} {v / 1e3:7.2f} {res['wall']['torch eager'] / v:6.2f} {cpu1}")
        if args.out:
            args.out.write_text(json.dumps({"loop": res, "reps": args.reps}, indent=2) + "\n")
        return
    r = preset(args.preset).restore
    B, R = args.batch or r.batch, r.R
    mods = modules(args.run, args.preset)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ORT_GRAPHS:
            results[name] = bench(name, mods[name], Path(tmp), args.reps, B, R)
    print(f"B*R = {B * R} rows, {torch.get_num_threads()} torch threads, onnxruntime {ort.__version__}, "
          f"torch {torch.__version__}; median of {args.reps} calls, ms (torch eager / x)")
    for name, res in results.items():
        print(f"\n{name:26s} {'wall':>8s} {'ratio':>6s} {'cpu1':>8s} {'ratio':>6s}")
        for k, v in res["wall"].items():
            c = res["cpu1"].get(k)
            ratio1 = f"{res['cpu1']['torch eager'] / c:6.2f}" if c else ""
            cpu1 = f"{c:8.0f}" if c else ""
            print(f"{k:26s} {v:8.0f} {res['wall']['torch eager'] / v:6.2f} {cpu1:>8s} {ratio1:>6s}")
    if args.out:
        args.out.write_text(json.dumps({"B": B, "R": R, "reps": args.reps, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
