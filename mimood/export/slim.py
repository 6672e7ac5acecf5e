"""A deployment copy of an export folder with fewer files: how the bundled model (mimood/assets/model/) stays
under 10 MB. The ONNX graphs repeat each model's weights (standard graph, onnxruntime copy, OOD feature graph),
so what can go without losing a backend's graphs is:

    "weights"     extra.weights: the checkpoint copies only `--backend torch` reads (it then says, in one line,
                  that the folder has no checkpoint; torch users train or export a run of their own)
    "ort_graphs"  extra.ort_graphs: onnxruntime's fused copies (the ort backend then runs the standard graphs),
                  and with them the int8 copies made from them (extra.int8, `mimood-export --int8`)
    "ort_graphs.<step>"  one step's fused (and int8) copy, e.g. "ort_graphs.atd" for an export whose detector is
                  "intensity" (its loop never runs the ATD; the bundled model keeps the MVTM step's fused,
                  row-skipping copy that way and stays under 10 MB)

Every file kept is copied byte for byte, so the recorded hashes still hold; the manifest is rewritten without
the dropped entries and checked by `Manifest.load` + `verify` before the call returns.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from mimood.contract import MANIFEST_NAME, ROW_GRAPHS, Manifest

DROPPABLE = ("weights", "ort_graphs")


def slim_copy(src: str | Path, dst: str | Path, drop: Sequence[str] = ("weights",)) -> int:
    """Copy export folder `src` to `dst` without the `drop` entries (see DROPPABLE); returns the bytes of the
    files the new manifest names (manifest included). Files in `dst` that an old manifest there named are
    replaced; other files in `dst` (a model card, notices) are left alone."""
    src, dst = Path(src), Path(dst)
    steps = {f"ort_graphs.{g}" for g in ROW_GRAPHS}        # one step's copies: "ort_graphs.atd", ...
    bad = [d for d in drop if d not in DROPPABLE and d not in steps]
    if bad:
        raise ValueError(f"cannot drop {bad}: only {DROPPABLE} or ort_graphs.<{'|'.join(ROW_GRAPHS)}>")
    manifest = Manifest.load(src)
    problems = manifest.verify(src)
    if problems:
        raise ValueError(f"{src}: not a complete export ({problems[0]})")
    for name in drop:
        if name not in DROPPABLE:                          # "ort_graphs.<step>": that step's copies only
            step = name.removeprefix("ort_graphs.")
            manifest.extra.ort_graphs.pop(step, None)
            if getattr(manifest.extra, "int8", None):
                manifest.extra.int8.pop(step, None)
        else:
            setattr(manifest.extra, name, {})
    if "ort_graphs" in drop and getattr(manifest.extra, "int8", None):     # derived from the fused copies
        manifest.extra.int8, manifest.extra.int8_maps = {}, None
    dst.mkdir(parents=True, exist_ok=True)
    if (dst / MANIFEST_NAME).exists():                     # the previous copy's files, then the new ones
        for _, file in Manifest.load(dst).files():
            (dst / file).unlink(missing_ok=True)
        (dst / MANIFEST_NAME).unlink()
    total = 0
    for _, file in manifest.files():
        (dst / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / file, dst / file)
        total += (dst / file).stat().st_size
    manifest.save(dst / MANIFEST_NAME)                     # last: a half-copied folder has no manifest
    problems = Manifest.load(dst).verify(dst)
    if problems:
        raise ValueError(f"{dst}: copy does not verify ({problems[0]})")
    return total + (dst / MANIFEST_NAME).stat().st_size
