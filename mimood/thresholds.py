"""The numbers that decide what a map and a mask say, checked wherever they are written or read.

A NaN threshold writes empty masks, a NaN lambda changes every map, and a string crashes deep in numpy: all
silently or far from the file that holds them. These checks run when `calibration.json` is written
(`mimood.eval.calibrate.calibrate`) and read (`read_calibration`: `load_calibration`, the exporter), and when
`manifest.json` is written and read (`check_manifest_values`: `mimood.contract.Manifest.save` and `.load`). Each
problem is an `InputError` naming the file and the key, e.g.
`run/calibration.json: 'threshold' must be a number in [0, 1], got NaN`.

Ranges: MIM-OOD's lambda and the token critic's are probabilities, [0, 1]; the MVTM-likelihood and AR lambdas
are NLLs, >= 0; every voxel threshold is an anomaly-map level, and maps lie in [0, 1]. No torch, numpy only for
its number types: the runtime and the export contract import this.
"""
from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

from mimood.config import DETECTORS, RESIDUALS
from mimood.errors import InputError

PROBABILITY = (0.0, 1.0)
NLL = (0.0, math.inf)
LAM_RANGE = {"mimood": PROBABILITY, "token_critic": PROBABILITY, "mvtm_likelihood": NLL, "ar": NLL}
THRESHOLD_RANGE = PROBABILITY


def check_number(value: Any, path: str | Path, key: str, low: float = -math.inf, high: float = math.inf,
                 integer: bool = False, allow_none: bool = False, low_open: bool = False) -> float | int | None:
    """`value` as a float (an int when `integer`) if it is a finite number in [low, high] ((low, high] with
    `low_open`), else `InputError(path, "'key' must be ...")`. Booleans and numeric strings are not numbers."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and integer:
        ok = isinstance(value, numbers.Integral) or (math.isfinite(value) and float(value).is_integer())
    if ok:
        v = float(value)
        ok = math.isfinite(v) and (v > low if low_open else v >= low) and v <= high
    if not ok:
        none = " (or null)" if allow_none else ""
        raise InputError(path, f"'{key}' must be {'an integer' if integer else 'a number'}"
                               f"{_range(low, high, low_open)}{none}, got {_show(value)}")
    return int(value) if integer else float(value)


def _range(low: float, high: float, low_open: bool) -> str:
    if math.isinf(high):
        return "" if math.isinf(low) else f" {'>' if low_open else '>='} {low:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}]"


def _show(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    text = json.dumps(value) if isinstance(value, (str, list, dict, bool)) or value is None else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_calibration(cal: Any, path: str | Path) -> dict:
    """Check a calibration dict (mimood.eval.calibrate): MIM-OOD's top-level "lam" and "threshold" (null =
    not calibrated for masks), and each "methods" entry's "lam" (when present) and "threshold". Returns `cal`."""
    if not isinstance(cal, dict):
        raise InputError(path, f"calibration must be a JSON object, got {_show(cal)}")
    for key in ("lam", "threshold"):
        if key not in cal:
            raise InputError(path, f"missing '{key}'")
    check_number(cal["lam"], path, "lam", *LAM_RANGE["mimood"])
    check_number(cal["threshold"], path, "threshold", *THRESHOLD_RANGE, allow_none=True)
    methods = cal.get("methods", {})
    if not isinstance(methods, dict):
        raise InputError(path, f"'methods' must be an object, got {_show(methods)}")
    for name, entry in methods.items():
        if not isinstance(entry, dict):
            raise InputError(path, f"'methods.{name}' must be an object, got {_show(entry)}")
        if "lam" in entry:
            check_number(entry["lam"], path, f"methods.{name}.lam", *LAM_RANGE.get(name, NLL))
        if "threshold" not in entry:
            raise InputError(path, f"missing 'methods.{name}.threshold'")
        check_number(entry["threshold"], path, f"methods.{name}.threshold", *THRESHOLD_RANGE, allow_none=True)
    return cal


def read_calibration(path: str | Path) -> dict | None:
    """The checked calibration at `path` (`check_calibration`), or None when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        cal = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"not valid JSON ({e})") from None
    return check_calibration(cal, path)


def check_manifest_values(d: dict, path: str | Path) -> dict:
    """Check the restoration numbers of a manifest dict (asdict(Manifest)): lam, threshold (or null), T, R,
    batch, temperature, min_pool, avg_pool, vocab_size, mask_id. Returns `d`. (`Manifest.load` and `.save`.)"""
    check_number(d.get("lam"), path, "lam", *LAM_RANGE["mimood"])
    check_number(d.get("threshold"), path, "threshold", *THRESHOLD_RANGE, allow_none=True)
    if d.get("detector", "atd") not in DETECTORS:
        raise InputError(path, f"'detector' must be one of {', '.join(DETECTORS)}, got {_show(d.get('detector'))}")
    check_number(d.get("lam_scan_percentile"), path, "lam_scan_percentile", 0, 100, allow_none=True, low_open=True)
    if d.get("residual", "abs") not in RESIDUALS:
        raise InputError(path, f"'residual' must be one of {', '.join(RESIDUALS)}, got {_show(d.get('residual'))}")
    check_number(d.get("contralateral", 0.0), path, "contralateral", 0, 1)
    check_number(d.get("T"), path, "T", 0, integer=True)
    for key in ("R", "batch", "min_pool", "avg_pool", "vocab_size"):
        check_number(d.get(key), path, key, 1, integer=True)
    check_number(d.get("temperature"), path, "temperature", 0, low_open=True)
    mask_id = check_number(d.get("mask_id"), path, "mask_id", 0, integer=True)
    if mask_id != d["vocab_size"]:
        raise InputError(path, f"'mask_id' must equal 'vocab_size' ({d['vocab_size']}), got {mask_id}")
    return d
