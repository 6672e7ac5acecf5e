"""The result tables of `mimood-eval`, each a function of an `EvalResult` (methods or cases as rows).

    token_table   paper Table 1: AP, AUROC of each method's token score (ground truth downsampled by 8, "any")
    pixel_table   paper Table 2: best Dice, AP, AUROC pooled over all evaluated brain voxels of the test set, plus
                  per-case Dice at the calibrated and at the pooled-best threshold, and time per 32 slices
    time_table    inference time per 32 slices
    case_table    per case: lesion size and each method's Dice at the calibrated / pooled-best threshold

`TABLES` is the list `mimood-eval` prints and writes to JSON (under each table's `key`); a new table (such as the
scan/slice-level OOD table of `mimood.ood`) is one more function appended there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mimood.eval.evaluate import EvalResult
from mimood.eval.metrics import dice, json_ready, pixel_metrics, token_metrics

PAPER_NAMES = {"mimood": "MIM-OOD", "mimood_paper": "MIM-OOD (paper ATD, lambda 0.005)", "ar": "AR restoration",
               "mvtm_likelihood": "MVTM likelihood", "dae": "Denoising autoencoder",
               "token_critic": "MVTM + Token Critic", "intensity": "Intensity",
               "mimood_intensity": "MIM-OOD, intensity detector (ablation)"}


@dataclass
class Column:
    key: str                  # JSON key
    header: str
    fmt: str = ".3f"          # format of a float value (ints and strings print as they are)


@dataclass
class Table:
    key: str                  # JSON key of the whole table
    title: str
    columns: list[Column]
    rows: dict[str, dict]     # row name -> {column key: value}
    notes: list[str] = field(default_factory=list)


def token_table(res: EvalResult) -> Table:
    """Token-level AP / AUROC of each method's token score, pooled over the brain tokens of all evaluated slices."""
    labels = np.concatenate([c.token_labels for c in res.cases])            # [S, N]
    brain = np.concatenate([c.brain_tokens for c in res.cases])
    rows = {}
    for m in res.methods:
        scores = np.concatenate([c.token_scores[m] for c in res.cases])
        rows[m] = token_metrics(scores, labels, mask=brain)
    score_names = {"mimood": "ATD probability", "ar": "AR NLL", "mvtm_likelihood": "MVTM NLL (lattice passes)",
                   "token_critic": "critic probability", "intensity": "mean intensity",
                   "mimood_paper": "ATD (paper) probability", "dae": "mean DAE residual"}
    return Table("token", "Token level (paper Table 1)", [Column("ap", "AP"), Column("auroc", "AUROC")], rows, [
        f"{int(brain.sum())} tokens with brain pixels in {len(labels)} slices, {int(labels[brain].sum())} of them "
        "lesion tokens (a token is a lesion token if any of its 8 x 8 pixels has label > 0)",
        "token scores: " + ", ".join(f"{m} = {score_names.get(m, m)}" for m in res.methods)])


def pixel_table(res: EvalResult) -> Table:
    """Pooled pixel metrics inside the brain, per-case Dice at two thresholds, inference time."""
    labels = np.concatenate([c.voxel_labels for c in res.cases])
    lesion_cases = [c for c in res.cases if c.voxel_labels.any()]
    rows = {}
    for m in res.methods:
        row = dict(pooled_pixel_metrics(res, m))
        for tag, t in (("calibrated", res.thresholds.get(m)), ("best", row["threshold"])):
            d = [dice(c.voxel_scores[m] >= t, c.voxel_labels) for c in lesion_cases] \
                if t is not None and not math.isnan(t) else []
            row[f"case_dice_{tag}_mean"] = float(np.mean(d)) if d else math.nan
            row[f"case_dice_{tag}_std"] = float(np.std(d)) if d else math.nan
        row["calibrated_threshold"] = res.thresholds.get(m, math.nan)
        row["seconds_per_32_slices"] = _per32(res, m)
        rows[m] = row
    cov = {k: sum(c.coverage[k] for c in res.cases) for k in res.cases[0].coverage}
    notes = [
        f"pooled over {len(labels)} brain voxels (input > 0) on the input grid of {len(res.cases)} cases, "
        f"{int(labels.sum())} of them lesion (label > 0); metrics are inside the brain only",
        f"per-case Dice: mean +- std over the {len(lesion_cases)} cases with lesion voxels",
        f"{cov['lesion'] - cov['lesion_in_view']} of {cov['lesion']} lesion voxels and "
        f"{cov['brain'] - cov['brain_in_view']} of {cov['brain']} brain voxels lie outside the 160 x 160 window or "
        "on skipped slices (score 0)",
    ]
    if res.settings["slice_stride"] > 1:
        notes.append(f"slice stride {res.settings['slice_stride']}: only the {cov['brain_evaluated']} brain voxels "
                     "mapped from the evaluated slices count")
    cols = [Column("dice", "[DICE]"), Column("ap", "AP"), Column("auroc", "AUROC"),
            Column("threshold", "best thr", ".4g"), Column("case_dice_best_mean", "Dice@best"),
            Column("calibrated_threshold", "cal thr", ".4g"), Column("case_dice_calibrated_mean", "Dice@cal"),
            Column("seconds_per_32_slices", "IT (s/32)", ".2f")]
    return Table("pixel", "Pixel level (paper Table 2)", cols, rows, notes)


def time_table(res: EvalResult) -> Table:
    rows = {m: {"seconds_per_32_slices": _per32(res, m), "seconds": sum(c.seconds[m] for c in res.cases),
                "slices": res.settings["slices"]} for m in res.methods}
    s = res.settings
    return Table("time", "Inference time", [Column("seconds_per_32_slices", "s / 32 slices", ".2f"),
                                            Column("seconds", "total s", ".1f"), Column("slices", "slices")], rows,
                 [f"wall clock per method including encoding and decoding, batches of {s['batch']}, R={s['R']}, "
                  f"T={s['T']}, {s['device']} with {s['torch_threads']} torch threads; ar uses the exact fast LSR "
                  "variant (the one-pass-per-position reference is timed by mimood-bench)"])


def case_table(res: EvalResult) -> Table:
    cols = [Column("lesion_voxels", "lesion vox")]
    for m in res.methods:
        cols += [Column(f"{m}.dice_best", f"{m}@best"), Column(f"{m}.dice_calibrated", f"{m}@cal")]
    rows = {}
    for c in res.cases:
        row = {"lesion_voxels": int(c.voxel_labels.sum())}
        for m in res.methods:
            best, cal = pooled_pixel_metrics(res, m)["threshold"], res.thresholds.get(m)
            row[m] = {"dice_best": math.nan if math.isnan(best) else dice(c.voxel_scores[m] >= best, c.voxel_labels),
                      "dice_calibrated": math.nan if cal is None else dice(c.voxel_scores[m] >= cal, c.voxel_labels),
                      "seconds": c.seconds[m]}
        rows[c.name] = row
    return Table("cases", "Per case Dice (pooled-best / calibrated threshold)", cols, rows,
                 ["a case without lesion voxels scores 1 if nothing is flagged, else 0"])


# The tables mimood-eval prints and writes, in order. The scan/slice-level OOD table (issue #7) is appended here.
TABLES: list[Callable[[EvalResult], Table]] = [token_table, pixel_table, time_table, case_table]


def pooled_pixel_metrics(res: EvalResult, m: str) -> dict[str, float]:
    """`pixel_metrics` of method m over all evaluated brain voxels, computed once per result (one sort of
    millions of voxels each)."""
    if m not in res.cache.setdefault("pixel", {}):
        scores = np.concatenate([c.voxel_scores[m] for c in res.cases])
        res.cache["pixel"][m] = pixel_metrics(scores, np.concatenate([c.voxel_labels for c in res.cases]))
    return res.cache["pixel"][m]


def _per32(res: EvalResult, m: str) -> float:
    return sum(c.seconds[m] for c in res.cases) / max(1, res.settings["slices"]) * 32


def format_table(t: Table, names: dict[str, str] | None = None) -> str:
    """Plain-text table: rows as in the paper, then the notes."""
    names = names or PAPER_NAMES
    label = [names.get(r, r) for r in t.rows]
    width = max([len("method")] + [len(s) for s in label])
    cells = [[_fmt(_lookup(row, c.key), c.fmt) for c in t.columns] for row in t.rows.values()]
    widths = [max([len(c.header)] + [len(r[i]) for r in cells]) for i, c in enumerate(t.columns)]
    lines = [t.title, "  ".join([" " * width] + [c.header.rjust(w) for c, w in zip(t.columns, widths)])]
    for name, r in zip(label, cells):
        lines.append("  ".join([name.ljust(width)] + [v.rjust(w) for v, w in zip(r, widths)]))
    lines += [f"  - {n}" for n in t.notes]
    return "\n".join(lines)


def _lookup(row: dict, key: str):
    """row["a.b"] -> row["a"]["b"] (nested per-method cells)."""
    for part in key.split("."):
        row = row.get(part) if isinstance(row, dict) else None
    return row


def _fmt(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (int, np.integer)) or isinstance(v, str):
        return str(v)
    return format(float(v), fmt)


def to_json(res: EvalResult, tables: list[Table]) -> dict:
    """{"settings": ..., <table key>: {row: {column: value}}, "notes": {<table key>: [...]}}; NaN -> null."""
    out = {"settings": res.settings}
    for t in tables:
        out[t.key] = json_ready(t.rows)
    out["notes"] = {t.key: t.notes for t in tables}
    return out
