"""Training: losses fall on a fixed batch, checkpoints round-trip, resume is exact, the `all` recipe and
torchrun DDP work end to end (tiny preset, seconds)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mimood.cli.train import main as train_cli
from mimood.config import DAEConfig, preset
from mimood.data.demo import make_demo
from mimood.errors import InputError
from mimood.models.checkpoint import build_model, load_model, read_info, save_model
from mimood.train import objectives
from mimood.train.recipes import train
from mimood.train.trainer import Trainer, lr_at, weights_digest

CFG = preset("tiny")
K = CFG.vqvae.num_embeddings


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo(out, n_train=3, n_test_lesion=1, n_test_healthy=0, progress=False)
    return out


@pytest.fixture(scope="module")
def run(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = train("all", out, preset("tiny"), [demo / "train"], progress=False)
    return out, summary


def _fixed(loss_fn, seed=0):
    """A loss function that sees the same batch (and masks) at every step."""
    return lambda model, step, rng: loss_fn(model, step, np.random.default_rng(seed))


@pytest.mark.parametrize("kind", ["vqvae", "mvtm", "atd", "ar", "dae"])
def test_loss_goes_down_on_a_fixed_batch(kind):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if kind in ("vqvae", "dae"):
        yy, xx = np.mgrid[0:160, 0:160] / 160.0
        images = np.stack([0.5 + 0.4 * np.sin(6 * xx + p) * np.cos(4 * yy - p) for p in range(4)])
        images[:, :, :30] = 0                                 # background
        images = images.astype(np.float16)
        if kind == "vqvae":
            loss_fn, _ = objectives.vqvae_objective(images, images, batch=4, val_batches=1)
            model = build_model(kind, CFG.vqvae)
        else:
            loss_fn, _ = objectives.dae_objective(images, images, 4, 1, CFG.dae)
            model = build_model(kind, DAEConfig(channels=(8, 16, 32)))
    else:
        tokens = rng.integers(0, K, (8, 400)).astype(np.int16)
        tokens[:, :200] = 3                                   # some structure to learn
        model = build_model(kind, CFG.transformer)
        loss_fn, _ = {"mvtm": lambda: objectives.mvtm_objective(tokens, tokens, 8, 1, CFG.masks),
                      "atd": lambda: objectives.atd_objective(tokens, tokens, 8, 1, CFG.masks, K),
                      "ar": lambda: objectives.ar_objective(tokens, tokens, 8, 1)}[kind]()
    fixed = _fixed(loss_fn)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        loss, _ = fixed(model.train(), step, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if kind == "vqvae":
            model.after_step(step + 1)                        # dead-code restarts, as in training
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    for kind in ("vqvae", "mvtm", "atd", "ar"):
        model = build_model(kind, CFG.vqvae if kind == "vqvae" else CFG.transformer).eval()
        path = tmp_path / f"{kind}.safetensors"
        save_model(model, path, kind, {"step": 7})
        loaded, info = load_model(path)
        assert info["kind"] == kind and info["meta"]["step"] == 7
        assert read_info(path)["config"] == info["config"]
        for k, v in model.state_dict().items():
            assert torch.equal(v, loaded.state_dict()[k]), k
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.safetensors"):
        load_model(tmp_path / "junk.safetensors")


def test_lr_schedule_warmup_then_cosine():
    o = CFG.optim_transformer
    o = type(o)(**{**o.__dict__, "steps": 100, "warmup_steps": 10, "lr": 1.0})
    assert lr_at(0, o) == pytest.approx(0.1)
    assert lr_at(9, o) == pytest.approx(1.0)
    assert lr_at(55, o) == pytest.approx(0.5)
    assert lr_at(100, o) == pytest.approx(0.0)


def test_resume_continues_exactly(tmp_path):
    """A run killed at step 12 resumes from its last checkpoint (step 10) and ends bit-identical to an
    uninterrupted run."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, K, (64, 400)).astype(np.int16)
    fns = objectives.mvtm_objective(tokens, tokens[:8], 8, 1, CFG.masks)
    o = type(CFG.optim_transformer)(**{**CFG.optim_transformer.__dict__, "steps": 20, "val_every": 5})

    def trainer(out, after_step=None):
        torch.manual_seed(123)
        return Trainer(build_model("mvtm", CFG.transformer), "mvtm", o, out, seed=0, after_step=after_step)

    full = trainer(tmp_path / "full")
    full.fit(*fns, progress=False)

    def kill(model, step):
        if step == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "part", after_step=kill).fit(*fns, progress=False)
    resumed = trainer(tmp_path / "part")
    assert resumed.resume() and resumed.step == 10
    result = resumed.fit(*fns, progress=False)
    assert result.steps == 20
    assert weights_digest(resumed.model) == weights_digest(full.model)
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert max(steps_logged) == 20 and 10 in steps_logged


def test_train_all_recipe(run):
    out, summary = run
    for kind in ("vqvae", "mvtm", "atd", "ar"):
        assert (out / kind / "best.safetensors").exists() and (out / kind / "last.safetensors").exists()
        assert summary[kind]["steps"] == CFG.optim_transformer.steps
        assert read_info(out / kind / "best.safetensors")["kind"] == kind
    assert {"mae", "perplexity", "usage"} <= set(summary["vqvae"]["last"])
    assert {"ap", "auroc", "lesion_auroc"} <= set(summary["atd"]["last"])   # tiny: both ATD corruptions
    lesions = np.load(out / "data" / "lesion_tokens.npz")
    assert lesions["train"].shape == lesions["train_target"].shape and lesions["train"].shape[-1] == 400
    assert str(lesions["vqvae_sha256"]) == str(np.load(out / "data" / "tokens.npz")["vqvae_sha256"])
    assert "masked_acc" in summary["mvtm"]["last"]
    tokens = np.load(out / "data" / "tokens.npz")
    assert tokens["train"].ndim == 3 and tokens["train"].shape[-1] == 400
    assert tokens["train"].max() < K
    assert json.loads((out / "config.json").read_text())["preset"] == "tiny"


def test_baseline_stages_train_on_the_run_and_join_the_methods(run, demo):
    """mimood-train dae / atd_paper write their checkpoints beside the run's models; once calibrated, mimood-eval's
    methods `dae` (the residual of a denoising autoencoder) and `mimood_paper` (the loop with the paper's ATD)
    give maps on the brain only."""
    from mimood.eval.calibrate import calibrate
    from mimood.eval.methods import available_methods, build_methods, load_models

    out, _ = run
    summary = train("dae", out, preset("tiny"), [], resume=True, progress=False)
    summary = train("atd_paper", out, preset("tiny"), [], resume=True, progress=False)
    assert summary["dae"]["steps"] == CFG.optim_dae.steps and "clean_residual_brain" in summary["dae"]["last"]
    assert read_info(out / "atd_paper" / "best.safetensors")["kind"] == "atd"
    assert {"ap", "auroc"} <= set(summary["atd_paper"]["last"]) and "lesion_auroc" not in summary["atd_paper"]["last"]
    assert {"dae", "mimood_paper"} <= set(available_methods(out))
    cal = calibrate(out, methods=["mimood", "mimood_paper", "dae"], slice_stride=4, progress=False)
    assert cal["methods"]["mimood_paper"]["lam"] == CFG.restore.lam                  # the paper's lambda
    assert cal["methods"]["dae"]["threshold"] > 0 and "lam" not in cal["methods"]["dae"]
    x = np.load(out / "data" / "val_slices.npz")["images"][:4].astype(np.float32)[:, None]
    methods = build_methods(load_models(out, ["dae", "mimood_paper"]), ["dae", "mimood_paper"], CFG.restore,
                            {"mimood_paper": 0.5})
    for name, m in methods.items():
        o = m(x, np.random.default_rng(0))
        assert o.maps.shape == (4, 160, 160) and o.token_scores.shape == (4, 400), name
        assert np.all(o.maps[x[:, 0] == 0] == 0) and o.maps.max() > 0, name


def test_real_recipe_material_reaches_the_caches(demo, tmp_path):
    """The `real` recipe's data options end to end on a tiny run: two --data sources with weights, the lesion
    volume's mirrored hemispheres in the slice cache, intensity-augmented token variants and lesion cache."""
    from mimood.data.slices import load_slice_set

    cfg = preset("tiny")
    cfg.data.lesion_margin, cfg.data.hemispheres, cfg.data.token_intensity_aug = 1, True, True
    cfg.data.source_weights = (1.0, 3.0)
    out = tmp_path / "real"
    train("vqvae", out, cfg, [demo / "train", demo / "test"], progress=False)
    train("atd", out, cfg, [demo / "train", demo / "test"], progress=False)
    s = load_slice_set(out / "data" / "train_slices.npz")
    assert s.mirrored.any() and s.source.tolist().count(1) >= 1
    p = s.probabilities()
    assert np.isclose(p[s.source[s.case] == 1].sum(), 0.75)                  # 1 : 3, whatever the slice counts
    tokens = np.load(out / "data" / "tokens.npz")
    assert str(tokens["vqvae_sha256"]).endswith("/aug=1")
    assert str(np.load(out / "data" / "lesion_tokens.npz")["generator"]).endswith("/aug")


def test_extra_reference_scans_join_the_ood_reference_once(run, demo):
    from mimood.ood.scan import OODScorer
    from mimood.train.ood_fit import add_reference_scans

    out, _ = run
    before = {k: list(v) for k, v in OODScorer.load(out).meta["reference"].items()}
    images = sorted((demo / "test" / "images").glob("*.nii.gz"))
    meta = add_reference_scans(out, [demo / "test" / "images"], progress=False)
    for name, scores in meta["reference"].items():
        assert scores[:len(before[name])] == before[name] and len(scores) == len(before[name]) + len(images)
        assert all(np.isfinite(scores))
    assert meta["reference_sources"]["extra"] == [str(p) for p in images]
    again = add_reference_scans(out, [demo / "test" / "images"], progress=False)     # already there: unchanged
    assert again["reference"] == meta["reference"] == OODScorer.load(out).meta["reference"]


def test_resume_of_a_finished_run_trains_nothing(run):
    out, _ = run
    before = (out / "atd" / "last.safetensors").stat().st_mtime_ns
    summary = train("atd", out, preset("tiny"), [], resume=True, progress=False)
    assert summary["atd"]["steps"] == CFG.optim_transformer.steps
    assert (out / "atd" / "last.safetensors").stat().st_mtime_ns == before


def test_cli_bad_data_is_one_line(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.nii.gz").write_bytes(b"garbage")
    (tmp_path / "bad" / "b.nii.gz").write_bytes(b"garbage")
    result = CliRunner().invoke(train_cli, ["vqvae", "--preset", "tiny", "-i", str(tmp_path / "bad"),
                                            "-o", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output


def test_torchrun_two_cpu_processes_agree(demo, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "mimood.cli.train", "all", "--preset", "tiny", "--steps", "4", "--quiet",
           "-i", str(demo / "train"), "-o", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kind in ("vqvae", "mvtm", "atd", "ar"):
        d0 = (tmp_path / "ddp" / kind / "weights.rank0.sha256").read_text()
        d1 = (tmp_path / "ddp" / kind / "weights.rank1.sha256").read_text()
        assert d0 == d1, kind
        assert load_model(tmp_path / "ddp" / kind / "last.safetensors")[1]["meta"]["step"] == 4
