"""`mimood-train {vqvae,mvtm,atd,ar,ood,all} -i DATA -o RUN`: train the models of a run folder (`ood`: fit the
scan-level OOD statistics of the trained MVTM into RUN/ood.safetensors; `all` ends with it).

Multi-process: `torchrun --nproc_per_node=N -m mimood.cli.train all -o RUN ...` (DistributedDataParallel; gloo on
CPU, nccl on GPUs). The old spellings --run/--run-dir (run folder) and --data still work in this release."""
from __future__ import annotations

import os

import click
import torch

from mimood.cli._common import Command, common, cpu_only, friendly_errors, renamed
from mimood.config import PRESETS, preset


def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        # CPU processes share the machine's cores: one thread each unless told otherwise
        if backend == "gloo" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // torch.distributed.get_world_size()))


@click.command(cls=Command, epilog="Old spellings --data, --run and --run-dir still work in this release "
                                   "(deprecated).")
@click.argument("what", type=click.Choice(["vqvae", "mvtm", "atd", "ar", "ood", "all", "dae", "atd_paper"]))
@click.option("-i", "--input", "data", multiple=True, type=click.Path(exists=True),
              help="Healthy training volumes (folder or file; repeatable). Default: the built-in demo data.")
@click.option("-o", "--output", "run", default="runs/default", show_default=True, type=click.Path(),
              help="Run folder (config, checkpoints, logs).")
@click.option("--preset", "preset_name", type=click.Choice(PRESETS), default="cpu", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override the preset's number of steps.")
@click.option("--resume", is_flag=True, help="Continue a run from its last checkpoints and saved config.")
@click.option("--modality", default="t2", show_default=True, help="File suffix of BraTS-style folders.")
@click.option("--lesion-margin", type=int, default=None,
              help="With labels: keep only slices at least this many mm from any lesion (default: the preset's; "
                   "0 for all presets but `real`, which uses 1).")
@click.option("--hemispheres", is_flag=True,
              help="With --lesion-margin: also train on the mirrored lesion-free half of slices whose lesion is "
                   "one-sided (mimood.data.slices).")
@click.option("--source-weights", default=None,
              help="Share of the training batches of each -i/--input source, comma-separated in -i order "
                   "(default: equal shares), e.g. 1,1.")
@click.option("--token-aug", is_flag=True,
              help="The token models also see intensity-augmented slices (robustness to other scanners).")
@click.option("--reference", multiple=True, type=click.Path(exists=True),
              help="With ood/all: healthy scans not trained on (folder or file; repeatable), scored as extra "
                   "reference scans of the [0,1] scan score (z-score and percentile need >= 20 references).")
@click.option("--bf16", is_flag=True, help="CPU bfloat16 autocast (faster on CPUs with AVX-512 bf16).")
@click.option("--seed", type=int, default=0, show_default=True)
@common(cpu=True)
@renamed("--data", "-i/--input", "data", multiple=True, type=click.Path(exists=True))
@renamed("--run", "-o/--output", "run", type=click.Path())
@renamed("--run-dir", "-o/--output", "run", type=click.Path())
@friendly_errors
def main(what, data, run, preset_name, steps, resume, modality, lesion_margin, hemispheres, source_weights,
         token_aug, reference, bf16, seed, device, quiet):
    """Train the VQ-VAE, the MVTM, the ATD and the AR baseline on healthy scans, then fit the OOD scan score
    (`all`); `dae` and `atd_paper` train the comparison baselines of mimood-eval on the same slices."""
    from mimood.train.recipes import train

    cpu_only(device, "mimood-train")
    _init_distributed()
    cfg = preset(preset_name)
    cfg.seed = seed
    cfg.data.modality = modality
    if lesion_margin is not None:
        cfg.data.lesion_margin = lesion_margin
    cfg.data.hemispheres = cfg.data.hemispheres or hemispheres
    cfg.data.token_intensity_aug = cfg.data.token_intensity_aug or token_aug
    if source_weights:
        try:
            cfg.data.source_weights = tuple(float(w) for w in source_weights.split(","))
        except ValueError:
            raise ValueError(f"--source-weights {source_weights!r}: expected numbers separated by commas") from None
    if cfg.data.hemispheres and cfg.data.lesion_margin <= 0:
        raise ValueError("--hemispheres needs --lesion-margin > 0 (it adds to the lesion-free slices)")
    for o in (cfg.optim_vqvae, cfg.optim_transformer, cfg.optim_dae):
        o.bf16 = bf16
        if steps is not None:
            o.steps = steps
            o.val_every = min(o.val_every, steps)
            o.warmup_steps = min(o.warmup_steps, steps // 10)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    try:
        summary = train(what, run, cfg, data, resume=resume, progress=not quiet, reference=reference)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        click.echo(f"run folder: {run}")
        for name, s in summary.items():
            if isinstance(s, dict) and "steps" in s:
                click.echo(f"  {name}: {s['steps']} steps, {s['seconds']} s, val {s['last']}")
            elif name == "ood" and s:
                click.echo(f"  ood: scan score {s['scan_score']} ({s['pass_type']} pass), {s['seconds']} s")


if __name__ == "__main__":
    main()
