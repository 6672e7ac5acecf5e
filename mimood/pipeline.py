"""The main job end to end on the built-in demo data (what `mimood-demo` and `make demo` run):

    demo data -> train (VQ-VAE, MVTM, ATD, AR) -> export ONNX -> infer on the demo test scans

Each stage is the library call its command makes; each stage is skipped when its output already exists, so
an interrupted demo continues where it stopped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from mimood.config import preset as make_preset


def run_demo(out: str | Path, preset: str = "cpu", steps: int | None = None, say: Callable[[str], None] = print,
             progress: bool = True) -> dict:
    from mimood.data.demo import make_demo
    from mimood.export.export import export_run
    from mimood.train.recipes import train

    out = Path(out)
    data, run, export = out / "data", out / "run", out / "run" / "export"
    result: dict = {"folder": str(out)}

    say(f"[1/3] demo data -> {data}")
    if not (data / "demo.json").exists():
        make_demo(data, progress=progress)
    cfg = make_preset(preset)
    if steps is not None:
        for o in (cfg.optim_vqvae, cfg.optim_transformer):
            o.steps, o.val_every, o.warmup_steps = steps, min(o.val_every, steps), min(o.warmup_steps, steps // 10)

    say(f"[2/3] training the {preset} preset -> {run}")
    result["train"] = train("all", run, cfg, [data / "train"], resume=(run / "config.json").exists(),
                            progress=progress)

    say(f"[3/3] exporting ONNX graphs -> {export}")
    manifest = export_run(run, export, batch=cfg.restore.batch, progress=progress)
    result["export"] = str(export)
    result["graphs"] = sorted(manifest.graphs)
    return result
