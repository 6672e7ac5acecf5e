"""int8 copies of the onnxruntime-only transformer graphs (`mimood-export --int8`, `--precision int8`), and the
map check that decides whether `mimood-infer` may use them.

    atd.int8.onnx, mvtm_step.int8.onnx    atd.ort.onnx / mvtm_step.ort.onnx with every MatMul against a weight
                                          in int8 (same inputs, outputs and symbolic rows)

Quantiser: onnxruntime.quantization's `quantize_static`, QDQ format: weights int8 per output channel,
activations uint8 with scales calibrated (min/max) on the export's validation inputs of the step (the loop's
own tokens, masks and noise; `calibration_feeds`). onnxruntime fuses each DequantizeLinear -> MatMul pair into
an integer matmul (MLAS: AVX-512 VNNI / AMX-INT8 where the CPU has them). Attention (contrib
MultiHeadAttention), LayerNorm, GELU, softmax and the sampling stay fp32.

Static, not dynamic quantisation: `quantize_dynamic` takes each activation's scale from the tensor of the call,
that is from every row in it, so a slice's map would depend on the slices it is packed with and on how the
engine cuts its rows (mimood.runtime.batching promises that it does not). Static scales are constants of
the graph: row i of the output depends on row i of the input only, as in fp32.

What it gains depends on the width. Measured on this 2-core AVX-512 VNNI/AMX machine (CPU time per ATD call,
1 thread, `benchmarks/README.md`): paper preset (width 512, 8 rows) fp32 2.15 s, static int8 1.03 s (2.1x),
dynamic 0.87 s (2.5x); cpu preset (width 64, 128 rows) fp32 0.65 s, static int8 0.72 s (0.9x), dynamic 0.63 s
(1.03x). At width 64 a matmul is 64 multiply-adds per value it writes: the dense layers are bound by memory
traffic, not arithmetic, and half of the time is attention, which stays fp32.

The map check (`check_maps`; the rule fp16 passed in benchmarks/runtime_maps.py): the whole loop on the
validation slices, fp32 with seed 0 (the reference), fp32 with seed 1 (the yardstick: the method's own sampling
noise) and int8 with seed 0; int8 passes when its maps are no further from the reference than the yardstick's
(mean |difference| and mask disagreement inside the brain). Both int8 steps are tried together, and when that
fails each alone; a step that fails is recorded as not accepted and never used.
"""
from __future__ import annotations

import logging
import tempfile
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from mimood.contract import ROW_GRAPHS, Int8GraphRecord, MapCheck, atomic_write, file_sha256, graph_io
from mimood.export.validate import map_agreement, seed_rule

METHOD = "onnxruntime.quantization.quantize_static {}: QDQ, MatMul weights int8 per channel, activations uint8 " \
         "(min/max calibration)"
CALIBRATION_ROWS = 32          # rows per calibration feed (the calibrator holds one feed's activations)


def calibration_feeds(name: str, feeds: dict[str, np.ndarray], max_rows: int = 4 * CALIBRATION_ROWS
                      ) -> list[dict[str, np.ndarray]]:
    """Step `name`'s inputs (every feed [n, N]) as calibration feeds of at most CALIBRATION_ROWS rows, distinct
    rows only (the R copies of a slice are one), at most max_rows in all."""
    n = len(next(iter(feeds.values())))
    keys = np.concatenate([feeds[k].reshape(n, -1).view(np.uint8) for k in sorted(feeds)], axis=1)
    _, first = np.unique(keys, axis=0, return_index=True)
    rows = np.sort(first)[:max_rows]
    return [{k: np.ascontiguousarray(v[rows[i:i + CALIBRATION_ROWS]]) for k, v in feeds.items()}
            for i in range(0, len(rows), CALIBRATION_ROWS)]


def quantize_int8(src: str | Path, dst: str | Path, calibration: list[dict[str, np.ndarray]]) -> dict:
    """Write the int8 copy of the onnxruntime-only graph `src` to `dst` (atomically); returns the op types of
    the nodes that now run in int8 (MatMuls fed by DequantizeLinear) with their counts."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(calibration)

        def get_next(self):
            return next(self.feeds, None)

    logging.getLogger().addFilter(_drop_preprocess_hint)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "int8.onnx"
            quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul"], per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
            model = onnx.load(str(out))
    finally:
        logging.getLogger().removeFilter(_drop_preprocess_hint)
    onnx.checker.check_model(model)
    with atomic_write(dst) as tmp:
        tmp.write_bytes(model.SerializeToString())
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    quantised = Counter(n.op_type for n in model.graph.node if n.op_type == "MatMul"
                        and all(producer.get(i) == "DequantizeLinear" for i in n.input))
    return dict(quantised)


def _drop_preprocess_hint(record: logging.LogRecord) -> bool:
    """quantize_static logs a hint to run its shape pre-processing first on the root logger at WARNING; our graphs
    come out of onnxscript's optimizer with their shapes inferred."""
    return "pre-processing before quantization" not in record.getMessage()


def int8_record(name: str, src: Path, dst: Path, quantised: dict[str, int], calibration: str) -> Int8GraphRecord:
    import onnxruntime

    return Int8GraphRecord(dst.name, file_sha256(dst), "int8", **graph_io(dst), source=src.name,
                           method=METHOD.format(onnxruntime.__version__), calibration=calibration,
                           quantized=quantised)


def check_maps(folder: Path, images: np.ndarray, threshold: float | None, seed: int = 0,
               say: Callable[[str], None] = lambda msg: None) -> MapCheck:
    """The map check (module docstring) of the int8 graphs of the export folder `folder` (its manifest saved)
    on slices images [B, H, W]; returns the record, whose `accepted` lists the steps that passed."""
    from mimood.runtime.batching import infer_slices
    from mimood.runtime.bundle import Bundle
    from mimood.runtime.ort import OrtEngine

    bundle = Bundle.open(folder)
    cfg = bundle.restore_config()
    brain = images > 0
    fp32 = OrtEngine(bundle, "fp32", "cpu")
    say("int8 map check: fp32 maps, seeds 0 and 1")
    ref = infer_slices(fp32, images, cfg, seed)
    yard = map_agreement(ref, infer_slices(fp32, images, cfg, seed + 1), brain, threshold)
    steps = [s for s in ROW_GRAPHS if bundle.int8_graph(s) is not None]
    candidates: dict[str, dict] = {}

    def check(chosen: list[str]) -> bool:
        key = "+".join(chosen)
        say(f"int8 map check: {key} in int8")
        engine = OrtEngine(bundle, "int8", "cpu", int8_steps=tuple(chosen))
        got = map_agreement(ref, infer_slices(engine, images, cfg, seed), brain, threshold)
        candidates[key] = {**got, "passed": all(seed_rule(got, yard).values())}
        return candidates[key]["passed"]

    if not steps or check(steps):
        accepted = steps
    else:                                         # together they fail: each alone; at most one may be kept
        alone = [s for s in steps if len(steps) > 1 and check([s])]
        accepted = sorted(alone, key=lambda s: candidates[s]["mean_abs_err"])[:1]
    return MapCheck(slices=len(images), seeds=[seed, seed + 1], threshold=threshold, yardstick=yard,
                    candidates=candidates, accepted=accepted)
