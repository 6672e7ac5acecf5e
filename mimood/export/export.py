"""`export_run`: a run folder -> a validated, self-describing export folder (`mimood-export`).

Export folder (default `<run>/export`):

    manifest.json                      `Manifest`: shapes, precisions, lambda, T, R, threshold, preprocessing,
                                       versions, hashes of graphs and weights, every validation check
    encode.onnx, atd.onnx, mvtm_step.onnx, decode_score.onnx             fp32 graphs (mimood.export.graphs)
    encode.fp16.onnx, ...              half-precision copies (--fp16): same I/O names, shapes and dtypes
    atd.ort.onnx, mvtm_step.ort.onnx   onnxruntime-only fp32 copies of the transformer graphs (contrib
                                       MultiHeadAttention; `mimood.export.graphs.export_ort`): faster on
                                       onnxruntime's CPU provider, not loadable by TensorRT
    weights/{vqvae,atd,mvtm}.safetensors   the run's best checkpoints (the runtime's torch backend)
    ood_features.onnx, ood.safetensors     when the run has fitted OOD statistics (`mimood-train ood`): the MVTM
                                       feature graph of the fitted pass type (tokens [B, N] int32 -> h [B, N, d])
                                       and the statistics; the scan score of every backend (mimood.ood.runtime)
    <graph>.<key>.engine(.json), timing.cache   TensorRT engines, where TensorRT and a GPU are present

Manifest keys: `graphs[k]` and `validation[k]` use the graph file's stem as k: "encode", "atd", "mvtm_step",
"decode_score" for fp32 and "encode.fp16", ... for fp16; `graphs[k]["precision"]` says which. The fp32 graphs
are always written; `--fp16` adds the fp16 ones.

The onnxruntime-only copies are not in `graphs` (every backend, TensorRT included, may pick any graph listed
there): `extra.ort_graphs[step]` records them, for step "atd" and "mvtm_step", with the same fields as a
`graphs` entry (file, sha256, precision "fp32", inputs, outputs) plus `source` (the standard graph they were
made from) and `rewrites` (how many times each rewrite applied); their checks are `validation["atd.ort"]`
and `validation["mvtm_step.ort"]`. An onnxruntime backend on the CPU should run them instead of atd.onnx and
mvtm_step.onnx (same inputs and outputs), after checking the hash as for any graph.

`extra.ood` (only with OOD statistics) records the scan score: `graph` (file, sha256, precision, inputs,
outputs), `stats` (file, sha256), and from the fit the chosen score (`scan_score`, also the manifest's
`scan_score`), `pass_type`, `aggregation` (brain-token threshold, top-k share of tokens per slice, top-m
slices per scan), the MVTM's hash and the healthy reference; its check is `validation["ood_features"]`.

Every graph (the onnxruntime-only copies too) is run in onnxruntime (CPU) on real held-out slices and compared
with its PyTorch module (fp32, eager) before it counts as done; the tolerances are `TOLERANCES` below. A failed
check fails the export and leaves nothing behind: everything is written into a hidden folder beside `out`, and
renamed to `out` only when complete (engines already in `out` are carried over, so unchanged graphs keep their
cached engines).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import torch

from mimood.config import DETECTORS, RunConfig
from mimood.contract import (MANIFEST_NAME, ExportValidation, FileRecord, GraphRecord, Manifest, OODRecord,
                             OrtGraphRecord, atomic_write, expected_io, file_sha256, graph_io, recorded_io)
from mimood.data.slices import load_slice_set
from mimood.errors import InputError
from mimood.export.graphs import (GRAPHS, IO_NAMES, OPSET, ORT_GRAPHS, build_modules, example_inputs,
                                  export_fp16, export_onnx, export_ort)
from mimood.export.quantize import calibration_feeds, check_maps, int8_record, quantize_int8
from mimood.export.validate import Check, compare, run_onnx
from mimood.models.checkpoint import load_model
from mimood.ood.scan import OOD_FILE
from mimood.thresholds import LAM_RANGE, check_number, read_calibration

MODELS = ("vqvae", "atd", "mvtm")
OOD_GRAPH = "ood_features.onnx"
FORCED_MASK = 0.25       # share of tokens masked at random in the MVTM check, on top of the ATD's own mask
SEED = 0                 # validation mask and noise


class ValidationError(RuntimeError):
    """An exported graph does not match its PyTorch module within `TOLERANCES`."""


@dataclass(frozen=True)
class Tolerances:
    """How far a graph's outputs may be from the PyTorch fp32 reference on the same inputs."""
    token_mismatch: float    # encode: share of token ids that may differ
    probs_atol: float        # atd: max |p - p_ref|
    mask_mismatch: float     # atd: share of `p > lambda` decisions that may differ
    sample_mismatch: float   # mvtm_step: share of masked positions whose draw may differ (unmasked: none)
    map_atol: float          # decode_score: max |map - map_ref| (maps lie in [0, 1])
    map_mean: float          # decode_score: mean |map - map_ref|


TOLERANCES = {
    # fp32: the same arithmetic in another order (onnxruntime's kernels vs torch's). Float outputs move by
    # ~1e-6; an id changes only when two codebook distances, or a CDF entry and its uniform draw, lie within
    # that of each other, which is rare (0.1% allowed).
    "fp32": Tolerances(token_mismatch=1e-3, probs_atol=1e-4, mask_mismatch=1e-3, sample_mismatch=1e-3,
                       map_atol=1e-4, map_mean=1e-5),
    # fp16: Conv/MatMul in half precision (relative step 2^-11 ~ 5e-4), everything that picks a token or
    # makes the map in fp32 (mimood.export.graphs.fp32_nodes).
    # - encode: features move by ~1e-3 relative, so a token whose two nearest codes are nearly equidistant
    #   may flip. Measured 0.1% with the cpu preset's trained VQ-VAE; 1% allowed.
    # - atd: probabilities move by ~1e-3 at most (the sigmoid's slope is <= 1/4 of the logit error; measured
    #   2e-4 on the paper preset), so only decisions within that of lambda flip; 1% allowed.
    # - mvtm_step: a masked draw flips when its uniform lies within the CDF's error of a CDF entry, so the
    #   flip rate is about the sum of the K CDF entries' errors. Such a draw is still a draw from a
    #   distribution within ~1e-3 of the reference; what the check must catch is a broken graph, which changes
    #   most draws. Measured 0.2% (tiny preset), 1.8% (paper preset, random weights), 2.2% (cpu preset, MVTM
    #   after 200 steps: a flat softmax over 256 codes); 5% allowed.
    # - decode_score: decoder outputs move by ~1e-4 (measured) and the pooling averages them; anomalies
    #   score ~0.1 and more.
    "fp16": Tolerances(token_mismatch=1e-2, probs_atol=1e-2, mask_mismatch=1e-2, sample_mismatch=5e-2,
                       map_atol=1e-2, map_mean=1e-3),
    # int8 (the transformer steps' copies only; mimood.export.quantize): the matmuls' inputs rounded to 1/255
    # of their calibrated range. These checks catch a broken graph; whether its maps may be used is the map
    # check's decision (the seed rule, Extra.int8_maps). Measured on the trained real-preset run (width 64,
    # 32 validation slices): ATD probabilities max |err| 0.016, no mask decision at lambda flipped; 12.4% of the
    # masked MVTM draws differ (a flat softmax over 256 codes moves by more than its CDF steps), and the map
    # check passed (mean |map err| 0.0038 against 0.0075 for fp32 with another seed). A broken graph moves the
    # probabilities by ~0.5 and most draws; 5e-2 / 5% / 20% allowed. Encode and decode_score have no int8 copy.
    "int8": Tolerances(token_mismatch=0.0, probs_atol=5e-2, mask_mismatch=5e-2, sample_mismatch=0.2,
                       map_atol=0.0, map_mean=0.0),
}


def export_run(run: str | Path, out: str | Path | None = None, batch: int = 32, fp16: bool = False,
               R: int | None = None, T: int | None = None, lam: float | None = None, validate: bool = True,
               build_engines: bool = True, progress: bool = True, int8: bool = False,
               detector: str | None = None) -> Manifest:
    """Export the run's best VQ-VAE, ATD and MVTM as the four loop graphs for batches of `batch` slices and
    R restorations (default: the run's config), validate them, and return the manifest written to `out`.

    lam: the detector threshold (default: `<run>/calibration.json`'s, else the config's). detector: what picks
    the tokens to re-sample at run time (config.DETECTORS; default the run's `restore.detector`); "intensity"
    takes its lambda and voxel threshold from the calibration's `mimood_intensity` entry, and the graphs are
    still checked at the ATD's lambda (the ATD graph stays in the folder). T: iterations (the
    graphs do not depend on it; it is recorded for inference). Raises `InputError` for a bad run folder and
    `ValidationError` when a graph fails its check (nothing is written then).
    """
    run = Path(run)
    out = run / "export" if out is None else Path(out)
    cfg = _load_config(run)
    r = cfg.restore
    R, T = r.R if R is None else R, r.T if T is None else T
    detector = r.detector if detector is None else detector
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; expected one of {', '.join(DETECTORS)}")
    calibration = _load_calibration(run, detector)
    if detector != "atd" and lam is None and "lam" not in calibration:
        raise InputError(run / "calibration.json", f"the {detector} detector needs a calibrated lambda: calibrate "
                                                   f"the run with the mimood_{detector} method, or give --lam")
    where = "--lam" if lam is not None else run / ("calibration.json" if "lam" in calibration else "config.json")
    lam = check_number(lam if lam is not None else calibration.get("lam", r.lam), where, "lam",
                       *LAM_RANGE["mimood"])                 # NaN or a string: refused before any graph is made
    threshold = calibration.get("threshold", r.threshold)
    graph_lam = lam if detector == "atd" else calibration.get("atd_lam", r.lam)   # the ATD graph's checks
    r = cfg.restore = replace(r, residual=calibration.get("residual", r.residual),     # the threshold's map rule
                              contralateral=calibration.get("contralateral", r.contralateral))
    if batch < 1 or R < 1 or T < 0:
        raise ValueError(f"need batch >= 1, R >= 1 and T >= 0 (got batch {batch}, R {R}, T {T})")
    _check_out(out)
    say = _printer(progress)

    models = {k: _load_checkpoint(run, k, cfg) for k in MODELS}
    K = models["vqvae"].cfg.num_embeddings
    if {models["atd"].cfg.vocab_size, models["mvtm"].cfg.vocab_size} != {K}:
        raise InputError(run, f"checkpoints disagree on the codebook size: vqvae {K}, atd "
                              f"{models['atd'].cfg.vocab_size}, mvtm {models['mvtm'].cfg.vocab_size}")
    modules = build_modules(models["vqvae"], models["atd"], models["mvtm"], r, R)
    x = feeds = None
    if validate or int8:                 # int8 calibrates on the validation inputs where the run has them
        try:
            x, n_blob, source = validation_slices(run, batch)
        except InputError:
            if validate:
                raise
        if x is not None:
            feeds, want = reference_io(modules, x, R, graph_lam)

    manifest = Manifest.from_config(cfg, batch=batch, R=R, T=T, lam=float(lam), threshold=threshold,
                                    vocab_size=K, mask_id=K, detector=detector,
                                    lam_scan_percentile=calibration.get("lam_scan_percentile")
                                    if detector != "atd" else None)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        precisions = ["fp32", "fp16"] if fp16 else ["fp32"]
        copies = ["ort"] + (["int8"] if int8 else [])             # of the row-wise steps (ORT_GRAPHS)
        for name in GRAPHS:
            for precision in precisions + (copies if name in ORT_GRAPHS else []):
                key = name if precision == "fp32" else f"{name}.{precision}"
                path = tmp / f"{key}.onnx"
                say(f"exporting {path.name}")
                if precision == "fp32":
                    export_onnx(name, modules[name], example_inputs(name, batch, R, K), path)
                    manifest.add_graph(key, path, precision)
                elif precision == "fp16":
                    report = export_fp16(name, tmp / f"{name}.onnx", path)
                    manifest.extra.fp16[key] = {k: v for k, v in report.items() if k != "io"}
                    manifest.add_graph(key, path, precision)
                elif precision == "ort":   # onnxruntime-only: recorded beside `graphs`, not in it (module docstring)
                    rows = tmp / f".{name}.rows.onnx"                  # the module again, rows symbolic
                    export_onnx(name, modules[name], example_inputs(name, batch, R, K), rows, rows=True)
                    rewrites = export_ort(rows, path)
                    rows.unlink()
                    record = OrtGraphRecord(path.name, file_sha256(path), "fp32", **graph_io(path),
                                            source=f"{name}.onnx", rewrites=rewrites)
                    got, io = recorded_io(record.inputs, record.outputs), expected_io(batch, R, rows=True)[name]
                    if got != io:
                        raise ValidationError(f"{path.name}: I/O {got}, expected {io} (rows symbolic)")
                    manifest.extra.ort_graphs[name] = record
                else:      # int8 copy of the onnxruntime-only graph (mimood.export.quantize)
                    cal, what = _calibration(name, feeds, batch, R, K, source if x is not None else None)
                    say(f"  calibrating on {what}")
                    quantised = quantize_int8(tmp / f"{name}.ort.onnx", path, cal)
                    manifest.extra.int8[name] = int8_record(name, tmp / f"{name}.ort.onnx", path, quantised, what)
                if validate:
                    tol = TOLERANCES[precision if precision in ("fp16", "int8") else "fp32"]  # ort computes in fp32
                    checks = check_graph(name, path, feeds[name], want[name], tol, graph_lam)
                    if precision in ("ort", "int8"):
                        checks += check_rows(name, path, feeds[name], want[name], tol, graph_lam)
                    manifest.validation[key] = [asdict(c) for c in checks]
                    failed = [str(c) for c in checks if not c.passed]
                    if failed and precision == "fp16" and any(np.isnan(c.max_abs_err) for c in checks):
                        failed.append("NaN outputs: values beyond fp16's range (65504) inside the graph? "
                                      "e.g. unused VQ codes with huge entries")
                    if failed and precision == "int8":          # not used, recorded; the export goes on
                        manifest.extra.int8[name].accepted = False
                        manifest.extra.int8[name].reason = f"graph check: {'; '.join(failed)}"
                        say(f"  {path.name} fails its check and will not be used: {'; '.join(failed)}")
                    elif failed:
                        raise ValidationError(f"{path.name} does not match PyTorch: {'; '.join(failed)}")
        if validate:
            manifest.extra.validation = ExportValidation(
                source=source, slices=batch, blob_slices=n_blob, lam=float(graph_lam),
                forced_mask=FORCED_MASK, mask_share=float(feeds["mvtm_step"]["mask"].mean()),
                seed=SEED, runtime="onnxruntime CPUExecutionProvider",
                tolerances={p: asdict(t) for p, t in TOLERANCES.items() if p in precisions})
        weights = tmp / "weights"
        weights.mkdir()
        for k in MODELS:
            shutil.copyfile(run / k / "best.safetensors", weights / f"{k}.safetensors")
        manifest.extra.weights = {k: FileRecord(f"weights/{k}.safetensors", file_sha256(weights / f"{k}.safetensors"))
                                  for k in MODELS}
        if (run / OOD_FILE).exists():
            say(f"exporting {OOD_GRAPH}")
            export_ood(run, tmp, models["mvtm"], batch, manifest, x if validate else None)
        manifest.versions["onnxscript"] = metadata.version("onnxscript")
        if fp16:
            manifest.versions["nvidia-modelopt"] = metadata.version("nvidia-modelopt")
        manifest.extra.opset = OPSET
        _carry_engines(out, tmp)
        if build_engines:
            manifest.extra.engines = make_engines(tmp, [k for k in manifest.graphs
                                                        if k.endswith(".fp16") == fp16], manifest, say)
        manifest.save(tmp / MANIFEST_NAME)
        if int8 and validate:
            say("int8 map check on the validation slices (no further from fp32 than another seed) ...")
            check = check_maps(tmp, x[:, 0].numpy(), threshold, SEED, say)
            manifest.extra.int8_maps = check
            for name, record in manifest.extra.int8.items():
                if record.accepted is None:
                    record.accepted = name in check.accepted
                    record.reason = "" if record.accepted else _map_reason(name, check)
            manifest.save(tmp / MANIFEST_NAME)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _calibration(name: str, feeds: dict | None, batch: int, R: int, K: int, source: str | None
                 ) -> tuple[list[dict[str, np.ndarray]], str]:
    """Calibration feeds of step `name` for its int8 copy, and what they are: the validation inputs of the step
    (for the ATD also the tokens after one MVTM step, what later iterations see), else random inputs."""
    if feeds is None:
        inputs = example_inputs(name, batch, R, K)
        step = dict(zip(IO_NAMES[name][0], (t.numpy() for t in inputs)))
        what = f"random inputs of the graph's shapes ({len(inputs[0])} rows; the run has no validation slices)"
    else:
        step = dict(feeds[name])
        if name == "atd":
            step = {"tokens": np.concatenate([feeds["atd"]["tokens"], feeds["decode_score"]["tokens"]])}
        what = f"the step's inputs on {batch} validation slices of {source}"
    cal = calibration_feeds(name, step)
    return cal, f"{what}: {sum(len(next(iter(c.values()))) for c in cal)} distinct rows"


def _map_reason(name: str, check) -> str:
    """Why the map check turned step `name`'s int8 graph down, in one line."""
    tried = [k for k in check.candidates if name in k.split("+")]
    parts = []
    for k in tried:
        c = check.candidates[k]
        mask = (f", mask disagreement {c['mask_disagreement']:.3%} vs {check.yardstick['mask_disagreement']:.3%}"
                if "mask_disagreement" in c else "")
        parts.append(f"{k} in int8: mean |map err| {c['mean_abs_err']:.3g} vs {check.yardstick['mean_abs_err']:.3g} "
                     f"for fp32 with another seed{mask}" + ("" if c["passed"] else " (failed)"))
    return "map check: " + "; ".join(parts) if parts else "map check: not accepted"


def export_ood(run: Path, folder: Path, mvtm, batch: int, manifest: Manifest, x: torch.Tensor | None) -> None:
    """Write the OOD feature graph and statistics into `folder` and record them in `manifest` (module
    docstring). With validation slices x [B,1,H,W], the graph's features of their tokens are compared with the
    PyTorch FeatureGraph's."""
    from mimood.ood.features import FeatureGraph
    from mimood.ood.scan import OODScorer, check_mvtm_hash

    scorer = OODScorer.load(run / OOD_FILE)
    check_mvtm_hash(run / "mvtm" / "best.safetensors", scorer.meta["mvtm_sha256"])
    graph = FeatureGraph(mvtm, scorer.meta["pass_type"]).eval()
    path = folder / OOD_GRAPH
    tokens = torch.zeros((batch, mvtm.cfg.seq_len), dtype=torch.int32)
    if x is not None:
        vqvae = _load_checkpoint(run, "vqvae")
        with torch.no_grad():
            tokens = vqvae.encode(x).flatten(1).to(torch.int32)                 # [B, N]
    program = torch.onnx.export(graph, (tokens,), input_names=["tokens"], output_names=["h"],
                                opset_version=OPSET, dynamo=True, external_data=False, verbose=False)
    onnx.checker.check_model(program.model_proto, full_check=True)
    buf = io.BytesIO()
    onnx.save(program.model_proto, buf)
    with atomic_write(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    if x is not None:
        with torch.no_grad():
            want = graph(tokens).numpy()
        # fp32 in another order: features (after the final LayerNorm, O(1)) move by ~1e-6
        checks = [compare("h", run_onnx(path, {"tokens": tokens.numpy()})["h"], want, atol=1e-3)]
        manifest.validation["ood_features"] = [asdict(c) for c in checks]
        failed = [str(c) for c in checks if not c.passed]
        if failed:
            raise ValidationError(f"{path.name} does not match PyTorch: {'; '.join(failed)}")
    shutil.copyfile(run / OOD_FILE, folder / OOD_FILE)
    manifest.scan_score = scorer.scan_score_name
    manifest.extra.ood = OODRecord(
        graph=GraphRecord(path.name, file_sha256(path), "fp32", **graph_io(path)),
        stats=FileRecord(OOD_FILE, file_sha256(folder / OOD_FILE)),
        **{k: v for k, v in scorer.summary().items() if k != "file"})


def check_graph(name: str, path: Path, feeds: dict[str, np.ndarray], want: dict[str, np.ndarray],
                tol: Tolerances, lam: float) -> list[Check]:
    """Run graph `name` from `path` in onnxruntime on `feeds` and compare with the reference `want`."""
    got = run_onnx(path, feeds)
    if name == "encode":
        return [compare("tokens", got["tokens"], want["tokens"], atol=0, max_mismatch_share=tol.token_mismatch)]
    if name == "atd":
        # A decision may flip where the reference lies within the allowed probability error of lambda; a
        # calibrated lambda is a quantile of real scores, so ties there are common (many equal background
        # tokens) and only the decisions away from it are compared.
        p, q = got["probs"], want["probs"]
        clear = np.abs(q - lam) > tol.probs_atol
        return [compare("probs", p, q, atol=tol.probs_atol),
                compare(f"probs > {lam:g}", (p > lam)[clear], (q > lam)[clear], atol=0,
                        max_mismatch_share=tol.mask_mismatch)]
    if name == "mvtm_step":
        m, t, u = feeds["mask"], got["tokens_out"], want["tokens_out"]
        return [compare("tokens_out[mask]", t[m], u[m], atol=0, max_mismatch_share=tol.sample_mismatch),
                compare("tokens_out[~mask]", t[~m], u[~m], atol=0)]
    if name == "decode_score":
        maps, ref = got["maps"], want["maps"]
        if maps.shape != ref.shape:
            return [compare("maps", maps, ref, atol=tol.map_atol)]
        mean_err = np.abs(maps.astype(np.float64) - ref).mean()
        return [compare("maps", maps, ref, atol=tol.map_atol),
                compare("maps (mean)", np.float64(mean_err), np.float64(0.0), atol=tol.map_mean)]
    raise ValueError(f"unknown graph {name!r}")


def check_rows(name: str, path: Path, feeds: dict[str, np.ndarray], want: dict[str, np.ndarray],
               tol: Tolerances, lam: float) -> list[Check]:
    """A graph with symbolic rows on another number of rows, in another order: every other row of `feeds`,
    last first, compared with the same rows of the reference (named "... (rows)"). Catches a graph that
    mixes rows or runs only at the traced number of rows; the onnxruntime engine runs any subset."""
    n = len(next(iter(feeds.values())))
    rows = np.arange(n)[::-1][::2]
    checks = check_graph(name, path, {k: np.ascontiguousarray(v[rows]) for k, v in feeds.items()},
                         {k: v[rows] for k, v in want.items()}, tol, lam)
    for c in checks:
        c.name = f"{c.name} ({len(rows)} of {n} rows)"
    return checks


def validation_slices(run: Path, batch: int) -> tuple[torch.Tensor, int, str]:
    """`batch` held-out slices x [B,1,H,W] float32 from `<run>/data/val_slices.npz`, spread over the set
    (repeated when it has fewer). Every other slice gets a bright disc inside the brain: the run's data are
    lesion-free, and an anomaly gives the ATD something to flag and the MVTM something to re-sample.
    Returns (x, number of slices with a disc, source description)."""
    path = run / "data" / "val_slices.npz"
    s = load_slice_set(path)
    if len(s) == 0:
        raise InputError(path, "no validation slices")
    pick = np.linspace(0, len(s) - 1, batch).round().astype(int) if len(s) >= batch else np.arange(batch) % len(s)
    x = s.images[pick].astype(np.float32)                                    # [B, H, W]
    H, W = x.shape[1:]
    yy, xx = np.mgrid[:H, :W]
    n_blob = 0
    for i in range(1, batch, 2):
        brain = np.argwhere(x[i] > 0)                                         # [P, 2]
        if len(brain) == 0:
            continue
        cy, cx = brain.mean(0)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 12 ** 2) & (x[i] > 0)    # 12 px ~ 1.5 tokens
        x[i][disc] = 1.0
        n_blob += 1
    return torch.from_numpy(x)[:, None], n_blob, f"{path.relative_to(run)} ({len(s)} slices)"


@torch.no_grad()
def reference_io(modules: dict, x: torch.Tensor, R: int, lam: float
                 ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]]]:
    """Inputs and PyTorch outputs of each graph along one loop step on x [B,1,H,W]. Each graph is fed the
    reference outputs of the graph before it, so each check measures one graph alone. The MVTM's mask is the
    ATD's (`p > lam`) plus a seeded random FORCED_MASK share, so enough tokens are re-sampled."""
    g = torch.Generator().manual_seed(SEED)
    tokens = modules["encode"](x)                                            # [B, N] int32
    rep = tokens.repeat_interleave(R, dim=0)                                 # [BR, N]
    probs = modules["atd"](rep)                                              # [BR, N]
    mask = (probs > lam) | (torch.rand(rep.shape, generator=g) < FORCED_MASK)
    noise = torch.rand(rep.shape, generator=g)                               # [BR, N] in [0, 1)
    sampled = modules["mvtm_step"](rep, mask, noise)                         # [BR, N] int32
    maps = modules["decode_score"](sampled, x)                               # [B, H, W]
    feeds = {"encode": {"x": x}, "atd": {"tokens": rep},
             "mvtm_step": {"tokens": rep, "mask": mask, "noise": noise},
             "decode_score": {"tokens": sampled, "x": x}}
    want = {"encode": [tokens], "atd": [probs], "mvtm_step": [sampled], "decode_score": [maps]}
    return ({k: {n: v.numpy() for n, v in f.items()} for k, f in feeds.items()},
            {k: dict(zip(IO_NAMES[k][1], (t.numpy() for t in w))) for k, w in want.items()})


def make_engines(folder: Path, keys: list[str], manifest: Manifest, say) -> str:
    """Build (or find cached) TensorRT engines for the graphs `keys` in `folder`; returns one status line."""
    from mimood.runtime.trt import ensure_engine, find_engine, trt_available

    ok, why = trt_available()
    if not ok:
        return f"TensorRT not available: {why}; ONNX graphs written"
    built, cached = [], []
    for k in keys:
        path, precision = folder / manifest.graphs[k]["file"], manifest.graphs[k]["precision"]
        if find_engine(path, precision) is not None:
            cached.append(k)
            continue
        say(f"building TensorRT engine for {path.name}")
        ensure_engine(path, precision, folder / "timing.cache")
        built.append(k)
    parts = [f"built {', '.join(built)}" if built else "", f"cached {', '.join(cached)}" if cached else ""]
    return f"TensorRT engines ({why}): " + "; ".join(p for p in parts if p)


def _printer(progress: bool):
    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)
    return say


def _load_config(run: Path) -> RunConfig:
    if not run.is_dir():
        raise InputError(run, "run folder not found")
    path = run / "config.json"
    if not path.is_file():
        raise InputError(path, "not found (is this a mimood run folder?)")
    try:
        return RunConfig.load(path)
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise InputError(path, f"not a valid run config ({e})") from None


def _load_calibration(run: Path, detector: str = "atd") -> dict:
    """`<run>/calibration.json`'s checked {"lam", "threshold"} for the detector when the run was calibrated
    (mimood.thresholds; a non-ATD detector reads its `methods.mimood_<detector>` entry and keeps the ATD's lambda
    as "atd_lam"), else {}."""
    path = run / "calibration.json"
    cal = read_calibration(path)
    if cal is None:
        return {}
    rules = cal.get("methods", {}).get("mimood" if detector == "atd" else f"mimood_{detector}")
    if rules is None and detector != "atd":
        raise InputError(path, f"has no 'methods.mimood_{detector}' entry: calibrate the run with the "
                               f"mimood_{detector} method for the {detector} detector")
    entry = cal if detector == "atd" else rules              # the ATD's pair: the top-level lam and threshold
    rules = rules or {}
    threshold = entry.get("threshold")
    return {"lam": float(entry["lam"]), "threshold": None if threshold is None else float(threshold),
            "atd_lam": float(cal["lam"]), "lam_scan_percentile": rules.get("lam_scan_percentile"),
            "residual": rules.get("residual", "abs"), "contralateral": rules.get("contralateral", 0.0)}


def _load_checkpoint(run: Path, kind: str, cfg: RunConfig | None = None):
    """The run's best `kind` model; with `cfg` (the run's config.json), its own stored config must match."""
    path = run / kind / "best.safetensors"
    if not path.is_file():
        raise InputError(path, f"checkpoint not found (train it: mimood-train {kind})")
    model, info = load_model(path)
    if info["kind"] != kind:
        raise InputError(path, f"holds a {info['kind']} model, expected {kind}")
    if cfg is not None:
        _check_config(path, kind, info["config"], cfg)
    return model


def _check_config(path: Path, kind: str, stored: dict, cfg: RunConfig) -> None:
    """A checkpoint trained with other model settings than the run's config.json says (a checkpoint copied from
    another run, an edited config) would be exported under the wrong preset and restoration parameters: refuse."""
    section = "vqvae" if kind == "vqvae" else "transformer"
    said = json.loads(json.dumps(asdict(getattr(cfg, section))))         # tuples -> lists, as stored
    differ = [k for k in sorted(set(said) | set(stored)) if said.get(k) != stored.get(k)]
    if differ:
        k = differ[0]
        more = f" (and {len(differ) - 1} more settings)" if len(differ) > 1 else ""
        raise InputError(path, f"trained with {section}.{k} = {json.dumps(stored.get(k))}, but "
                               f"{path.parent.parent / 'config.json'} (preset {cfg.preset!r}) says "
                               f"{json.dumps(said.get(k))}{more}: a checkpoint from another run?")


def _check_out(out: Path) -> None:
    """`out` is replaced whole at the end: refuse a folder that is not an export folder."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file())):
        raise InputError(out, "exists and is not an export folder (no manifest.json); not replacing it")


def _carry_engines(out: Path, tmp: Path) -> None:
    """Copy the previous export's engines and timing cache, so unchanged graphs reuse their engines
    (`find_engine` deletes those whose graph changed)."""
    if out.is_dir():
        for f in [*out.glob("*.engine"), *out.glob("*.engine.json"), *out.glob("timing.cache")]:
            shutil.copyfile(f, tmp / f.name)


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` to `out`, replacing a previous export."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
