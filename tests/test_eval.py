"""Calibration, evaluation, tables and `mimood-eval` on a tiny run (untrained tiny models, small synthetic scans
written as real NIfTI files): thresholds, the slice -> volume mapping of the pixel metrics, the JSON contract."""
import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mimood.cli.eval import main
from mimood.config import LAM_PERCENTILE, preset
from mimood.data.discover import discover
from mimood.data.preprocess import Slices, normalise
from mimood.data.slices import build_slice_set, save_slice_set
from mimood.eval.calibrate import calibrate, load_calibration, synthetic_corruption_check
from mimood.eval.evaluate import CaseResult, EvalResult, evaluate
from mimood.eval.methods import available_methods
from mimood.eval.metrics import pixel_metrics, token_metrics
from mimood.eval.report import evaluate_run
from mimood.eval.tables import case_table, pixel_table, time_table, to_json, token_table
from mimood.eval.token_critic import critic_objective, train_token_critic
from mimood.models.checkpoint import load_model, read_info, save_model
from mimood.models.transformer import TokenTransformer
from mimood.models.vqvae import VQVAE
from mimood.ood.scan import brain_share
from mimood.restore import restore
from mimood.runtime.torch_backend import TorchEngine
from mimood.train.ood_fit import OODFitConfig, fit_ood

CFG = preset("tiny")
METHODS = ("mimood", "ar", "mvtm_likelihood", "intensity", "mimood_intensity")   # every method the tiny run can serve


def _volume(rng, lesion: bool):
    """64 x 64 x 20 voxels at 1 mm (RAS): an ellipsoid 'brain' of textured tissue, optionally a bright block
    (the lesion, label 1) whose intensities overlap the tissue's."""
    x, y, z = np.meshgrid(np.arange(64), np.arange(64), np.arange(20), indexing="ij")
    brain = ((x - 32) / 28) ** 2 + ((y - 32) / 26) ** 2 + ((z - 10) / 14) ** 2 < 1
    vol = np.where(brain, 100 + 20 * rng.standard_normal(brain.shape), 0).astype(np.float32)
    label = np.zeros(brain.shape, np.uint8)
    if lesion:
        label[20:34, 24:40, 6:14] = 1
        vol[label > 0] = 150 + 30 * rng.standard_normal(int(label.sum()))
    vol[brain] = np.maximum(vol[brain], 1.0)
    return vol, label


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A run folder (config, untrained tiny models, two healthy hold-out volumes) and a labelled test set."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    run, healthy, test = root / "run", root / "healthy", root / "test"
    for d in (healthy, test / "images", test / "labels"):
        d.mkdir(parents=True)
    for i in range(2):
        nib.save(nib.Nifti1Image(_volume(rng, False)[0], np.eye(4)), healthy / f"h{i}.nii.gz")
    for name, lesion in (("a_lesion", True), ("b_lesion", True), ("c_healthy", False)):
        vol, label = _volume(rng, lesion)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), test / "images" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), test / "labels" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(_volume(rng, True)[0], np.eye(4)), test / "images" / "d_unlabelled.nii.gz")
    CFG.save((run / "config.json", run.mkdir())[0])
    torch.manual_seed(0)
    save_model(VQVAE(CFG.vqvae), run / "vqvae" / "best.safetensors", "vqvae")
    for task in ("mvtm", "atd", "ar"):
        save_model(TokenTransformer(CFG.transformer, task), run / task / "best.safetensors", task)
    val, _ = build_slice_set(discover(healthy), CFG.data, progress=False)
    save_slice_set(val, run / "data" / "val_slices.npz")
    with torch.no_grad():                                   # the token cache the Token Critic trains on
        tokens = load_model(run / "vqvae" / "best.safetensors")[0].encode(
            torch.from_numpy(val.images.astype(np.float32))[:, None]).flatten(1).to(torch.int16).numpy()
    fg = brain_share(val.images > 0)                           # the brain share per token, as training caches it
    np.savez(run / "data" / "tokens.npz", train=tokens[None], val=tokens, fg_train=fg, fg_val=fg)
    save_slice_set(val, run / "data" / "train_slices.npz")    # the OOD fit reads the slice positions
    return run, test


def test_calibration_writes_thresholds_that_flag_the_requested_share(tiny):
    run, _ = tiny
    cal = calibrate(run, methods=("mimood", "intensity"), lam_percentile=90, voxel_percentile=95, progress=False)
    assert load_calibration(run) == cal
    assert set(cal["methods"]) == {"mimood", "intensity"} and cal["data"]["volumes"] == ["h0", "h1"]
    assert cal["lam"] == cal["methods"]["mimood"]["lam"] and cal["threshold"] == cal["methods"]["mimood"]["threshold"]
    # redo the restoration independently: the threshold flags ~5% of the healthy brain pixels
    models = {k: load_model(run / k / "best.safetensors")[0] for k in ("vqvae", "atd", "mvtm")}
    cfg = CFG.restore
    eng = TorchEngine(models["vqvae"], models["atd"], models["mvtm"], cfg)
    with np.load(run / "data" / "val_slices.npz") as z:
        images = z["images"].astype(np.float32)
    rng = np.random.default_rng(cfg.seed)
    maps = np.concatenate([restore(eng, images[i:i + cfg.batch, None], cfg, rng, lam=cal["lam"]).maps
                           for i in range(0, len(images), cfg.batch)])
    share = float(np.mean(maps[images > 0] >= cal["threshold"]))
    assert share == pytest.approx(0.05, abs=0.005) and share == pytest.approx(cal["methods"]["mimood"]["flagged_share"])
    # lambda = P90 of the ATD scores of healthy brain tokens: at most 10% of them above it
    scores, brain = _healthy_token_scores(run, "atd")
    assert cal["lam"] == pytest.approx(np.percentile(scores[brain], 90), rel=1e-6)
    share = cal["methods"]["mimood"]["healthy_token_share_above_lam"]
    assert share == pytest.approx(np.mean(scores[brain] > cal["lam"])) and 0.05 < share <= 0.10
    # label-free checks of the ATD at lambda: both kinds it was trained on (tiny: masks.lesion_share 0.5)
    for check in ("synthetic_corruptions", "synthetic_lesions"):
        c = cal["methods"]["mimood"][check]
        assert 0.0 <= c["clean_share_above_lam"] <= 1.0, check
        # null only when no synthetic lesion changed a code (a 20-step tokenizer may still be near-collapsed)
        assert c["corrupted_tokens"] == 0 or 0.0 <= c["corrupted_share_above_lam"] <= 1.0, check
    assert cal["methods"]["mimood"]["synthetic_corruptions"]["corrupted_tokens"] > 0
    # intensity: P95 of the healthy normalised intensities
    assert cal["methods"]["intensity"]["threshold"] == pytest.approx(np.percentile(images[images > 0], 95), rel=1e-6)


def test_pixel_metrics_on_the_input_grid_match_a_direct_computation(tiny):
    run, test = tiny
    cal = calibrate(run, methods=("mimood",), lam_percentile=None, slice_stride=2, progress=False)
    assert cal["lam"] == CFG.restore.lam and cal["methods"]["mimood"]["lam_rule"].startswith("configured")
    assert cal["data"]["restored_slices"] == (cal["data"]["slices"] + 1) // 2
    for stride in (1, 3):
        res = evaluate(run, test, methods=("intensity",), slice_stride=stride, progress=False)
        # intensity baseline = the normalised input: metrics straight from the NIfTI files, no slices involved
        scores, labels = [], []
        for c in res.cases:
            vol = nib.load(test / "images" / f"{c.name}.nii.gz").get_fdata(dtype=np.float32)
            lab = np.asarray(nib.load(test / "labels" / f"{c.name}.nii.gz").dataobj) > 0
            brain = vol != 0
            norm = normalise(vol, brain, CFG.data)[0]
            z = np.zeros(vol.shape[2], bool)
            z[c.slices.index[::stride]] = True                      # RAS input: axis 2 is the slice axis
            keep = brain & z[None, None, :]
            scores.append(norm[keep])
            labels.append(lab[keep])
            assert c.coverage["lesion_evaluated"] == int(lab[keep].sum()) and len(c.rows) == int(z.sum())
        want = pixel_metrics(np.concatenate(scores), np.concatenate(labels))
        got = pixel_table(res).rows["intensity"]
        assert 0.5 < want["auroc"] < 1.0                             # overlapping intensities: a real ranking
        for k in ("dice", "ap", "auroc", "threshold"):
            assert got[k] == pytest.approx(want[k], rel=1e-9), (stride, k)


def _hand_result(thresholds):
    """Two 'cases' of one 16 x 16 slice (2 x 2 tokens) with hand-set voxel and token scores."""
    def case(name, voxel_scores, voxel_labels, token_scores, lesion_rows, seconds):
        labels = np.zeros((1, 16, 16), bool)
        labels[0, lesion_rows] = True
        s = Slices(images=np.ones((1, 16, 16), np.float32), brain=np.ones((1, 16, 16), bool), index=np.arange(1),
                   geometry=None, labels=labels)
        return CaseResult(name, s, np.arange(1), np.zeros((1, 4), np.int32),
                          token_scores={"m": np.array([token_scores], np.float32)}, seconds={"m": seconds},
                          voxel_scores={"m": np.array(voxel_scores, np.float32)},
                          voxel_labels=np.array(voxel_labels, bool),
                          coverage={"brain": 4, "lesion": 2, "brain_in_view": 4, "lesion_in_view": 2,
                                    "brain_evaluated": 4, "lesion_evaluated": 2})
    cases = [case("one", [0.1, 0.4], [0, 0], [0.9, 0.1, 0.2, 0.3], slice(0, 8), 1.0),   # top tokens are lesion
             case("two", [0.35, 0.8], [1, 1], [0.5, 0.6, 0.7, 0.4], slice(8, 16), 3.0)]  # bottom tokens are lesion
    settings = {"slice_stride": 1, "slices": 2, "batch": 32, "R": 4, "T": 8, "device": "cpu", "torch_threads": 1}
    return EvalResult(None, None, ["m"], {"m": 0.1}, thresholds, settings, cases)


def test_tables_against_hand_computed_values():
    res = _hand_result({"m": 0.5})
    # pooled voxels: 0.1(-) 0.4(-) 0.35(+) 0.8(+): AUROC 3/4, AP 5/6, best Dice 0.8 at 0.35 (tests/test_metrics.py)
    row = pixel_table(res).rows["m"]
    assert (row["auroc"], row["ap"], row["dice"], row["threshold"]) == pytest.approx((0.75, 5 / 6, 0.8, 0.35))
    # per case, lesion cases only: case two at the calibrated 0.5 flags 0.8 only -> Dice 2/3; at 0.35 -> 1
    assert row["case_dice_calibrated_mean"] == pytest.approx(2 / 3) and row["case_dice_best_mean"] == 1.0
    assert row["case_dice_calibrated_std"] == 0.0
    # time: 4 s for 2 slices -> 64 s per 32 slices
    assert time_table(res).rows["m"]["seconds_per_32_slices"] == pytest.approx(64.0)
    cases = case_table(res).rows
    # case one has no lesion: 0.4 >= 0.35 flags a voxel -> 0; at 0.5 nothing flagged -> 1
    assert cases["one"]["m"] == {"dice_best": 0.0, "dice_calibrated": 1.0, "seconds": 1.0}
    # tokens: lesion .9 .1 .7 .4 vs healthy .2 .3 .5 .6: 4 + 0 + 4 + 2 of 16 pairs ranked right
    tok = token_table(res).rows["m"]
    assert tok == token_metrics([0.9, 0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.4], [1, 1, 0, 0, 0, 0, 1, 1])
    assert tok["auroc"] == pytest.approx(10 / 16)


def test_json_turns_nan_into_null():
    res = _hand_result({})                                          # uncalibrated: no per-case calibrated Dice
    out = to_json(res, [pixel_table(res)])
    assert out["pixel"]["m"]["case_dice_calibrated_mean"] is None
    assert math.isnan(pixel_table(res).rows["m"]["calibrated_threshold"])
    json.dumps(out, allow_nan=False)


def test_cli_prints_both_tables_and_writes_the_json_contract(tiny, tmp_path):
    run, test = tiny
    (run / "calibration.json").unlink(missing_ok=True)
    out = tmp_path / "eval.json"                                    # -o DIR: DIR/eval.json and DIR/png/
    r = CliRunner().invoke(main, ["-m", str(run), "-i", str(test), "-o", str(tmp_path), "--max-cases", "2",
                                  "--slice-stride", "2", "-T", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "Token level" in r.output and "Pixel level" in r.output and "inside the brain" in r.output
    assert "calibrating" in r.output                               # no calibration.json: calibrated first
    cal = load_calibration(run)
    assert set(cal["methods"]) == set(METHODS)
    # the default lambda rule: P90 of the healthy hold-out's ATD token scores (not the configured 0.005)
    scores, brain = _healthy_token_scores(run, "atd")
    assert LAM_PERCENTILE == 90.0
    assert cal["lam"] == pytest.approx(np.percentile(scores[brain], 90), rel=1e-6)
    assert cal["methods"]["mimood"]["lam_rule"] == "P90 of ATD scores of healthy brain tokens"
    assert cal["data"]["slice_stride"] == 2                        # --slice-stride thins the hold-out too
    j = json.loads(out.read_text())
    for m in METHODS:
        assert set(j["pixel"][m]) >= {"dice", "ap", "auroc"} and set(j["token"][m]) >= {"ap", "auroc"}
        assert all(0.0 <= j["pixel"][m][k] <= 1.0 for k in ("dice", "ap", "auroc"))
        assert j["time"][m]["seconds_per_32_slices"] >= 0.0
    s = j["settings"]
    assert (s["cases"], s["slice_stride"], s["T"]) == (2, 2, 1)
    assert [p.rsplit("/", 1)[1] for p in s["skipped_unlabelled"]] == ["d_unlabelled.nii.gz"]
    assert s["lams"]["mimood"] == cal["lam"]
    assert s["lams"]["mvtm_likelihood"] == cal["methods"]["mvtm_likelihood"]["lam"]
    assert s["lams"]["mimood_intensity"] == cal["methods"]["mimood_intensity"]["lam"]
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["a_lesion.png", "b_lesion.png"]


def test_cli_adds_the_thresholds_a_calibration_lacks(tiny, tmp_path):
    """mimood-demo calibrates MIM-OOD only; evaluating a baseline on such a run recalibrates first."""
    run, test = tiny
    calibrate(run, methods=("mimood",), progress=False)
    r = CliRunner().invoke(main, ["-m", str(run), "-i", str(test), "--methods", "mimood,intensity",
                                  "--max-cases", "1", "--slice-stride", "4", "-T", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "has no thresholds for intensity: recalibrating" in r.output
    assert set(load_calibration(run)["methods"]) >= {"mimood", "intensity"}


def test_calibrate_only_the_methods_asked_for_on_a_run_without_the_ar_baseline(tiny, tmp_path):
    """A run trained without `mimood-train ar` has no AR baseline: calibrating must not need it."""
    run = tmp_path / "run"
    shutil.copytree(tiny[0], run, ignore=lambda d, names: ["ar", "critic", "calibration.json"])
    assert "ar" not in available_methods(run) and "mimood" in available_methods(run)
    r = CliRunner().invoke(main, ["-m", str(run), "--calibrate", "--methods", "mimood", "--slice-stride", "4",
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    assert set(load_calibration(run)["methods"]) == {"mimood"}


def test_cli_adds_the_scan_level_ood_table_when_the_run_has_ood_statistics(tiny, tmp_path):
    run, test = tiny
    fit_ood(run, OODFitConfig(), out=tmp_path / "ood.safetensors", progress=False)
    (run / "ood.safetensors").symlink_to(tmp_path / "ood.safetensors")   # this test's run only: removed below
    try:
        out = tmp_path / "eval.json"
        r = CliRunner().invoke(main, ["-m", str(run), "-i", str(test), "--json", str(out), "--methods",
                                      "intensity", "--slice-stride", "2", "--quiet"])      # the old --json FILE
    finally:
        (run / "ood.safetensors").unlink()
    assert r.exit_code == 0, r.output
    j = json.loads(out.read_text())
    scores = {"vim", "residual", "mahalanobis", "knn", "energy", "max_logit", "nll", "mirror", "atd", "map"}
    assert set(j["scan"]) >= scores and set(j["slice"]) >= scores
    for level in ("scan", "slice"):
        for v in j[level].values():                               # 2 lesion scans and 1 healthy: all defined
            assert set(v) == {"auroc", "aupr", "fpr95"} and all(0.0 <= x <= 1.0 for x in v.values())
    assert set(j["token"]) >= {"intensity", "vim", "residual"} and j["ood"]["scan_score"] in scores
    assert "OOD scores" in r.output


def test_evaluate_run_is_the_cli_without_click(tiny, tmp_path):
    """What mimood-eval does, from Python: the JSON contract returned and written, the tables said, no ood table
    without statistics."""
    run, test = tiny
    said, notes = [], []
    report = evaluate_run(run, test, json_path=tmp_path / "e.json", methods=("intensity",), max_cases=1,
                          slice_stride=4, T=1, progress=False, say=said.append, note=notes.append)
    assert report.result == json.loads((tmp_path / "e.json").read_text())
    assert set(report.result["pixel"]) == {"intensity"} and report.result["settings"]["cases"] == 1
    assert "Pixel level" in report.text and any("Pixel level" in line for line in said)
    assert any("no scan-level OOD table" in s for s in said) and report.calibration == load_calibration(run)
    with pytest.raises(ValueError, match="give data"):
        evaluate_run(run)


def test_cli_reports_bad_input_in_one_line(tiny, tmp_path):
    run, test = tiny
    (tmp_path / "images").mkdir()
    nib.save(nib.Nifti1Image(_volume(np.random.default_rng(1), True)[0], np.eye(4)), tmp_path / "images" / "x.nii.gz")
    r = CliRunner().invoke(main, ["-m", str(run), "-i", str(tmp_path), "--methods", "intensity", "--quiet"])
    assert r.exit_code == 2 and "error:" in r.output and "no case has a label" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(main, ["-m", str(run), "-i", str(test), "--methods", "mimood,bogus"])
    assert r.exit_code == 2 and "bogus" in r.output


def test_token_critic_learns_which_tokens_the_mvtm_sampled_and_joins_the_methods(tiny, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny[0], run)
    mvtm = load_model(run / "mvtm" / "best.safetensors")[0]
    with np.load(run / "data" / "tokens.npz") as z:
        tokens = z["val"]
    loss_fn, val_fn = critic_objective(tokens, tokens, mvtm, 4, 1, CFG.masks)
    critic = TokenTransformer(CFG.transformer, "atd")
    loss, metrics = loss_fn(critic, 0, np.random.default_rng(0))
    assert loss.requires_grad and 0.0 < metrics["mask_share"] <= 1.0
    # an untrained critic outputs ~0.5 everywhere: BCE ~ log 2 against the mask
    assert val_fn(critic.eval())["loss"] == pytest.approx(math.log(2), abs=0.1)
    assert "token_critic" not in available_methods(run)
    train_token_critic(run, steps=2, progress=False)
    assert read_info(run / "critic" / "best.safetensors")["kind"] == "atd"
    assert "token_critic" in available_methods(run)
    cal = calibrate(run, methods=("token_critic",), slice_stride=4, progress=False)
    entry = cal["methods"]["token_critic"]
    assert set(cal["methods"]) == {"mimood", "token_critic"}
    assert entry["lam_rule"].startswith("P99 of critic scores")
    scores, brain = _healthy_token_scores(run, "critic")
    assert entry["lam"] == pytest.approx(np.percentile(scores[brain], 99), rel=1e-6)
    assert entry["healthy_token_share_above_lam"] <= 0.01


def test_synthetic_corruption_check_counts_brain_tokens_above_lambda(tiny):
    run, _ = tiny
    atd = load_model(run / "atd" / "best.safetensors")[0]
    with np.load(run / "data" / "tokens.npz") as z:
        tokens = z["val"].astype(np.int64)                                     # [M, N]
    brain = np.zeros(tokens.shape, bool)
    brain[:, :200] = True                                                      # corruptions only here
    low, high = (synthetic_corruption_check(atd, tokens, brain, CFG.masks, lam, seed=3) for lam in (-1.0, 1.0))
    assert low["corrupted_share_above_lam"] == 1.0 and low["clean_share_above_lam"] == 1.0   # sigmoid > -1
    assert high["corrupted_share_above_lam"] == 0.0 and high["clean_share_above_lam"] == 0.0  # sigmoid <= 1
    assert 0 < low["corrupted_tokens"] == high["corrupted_tokens"] < brain.sum()           # same seed, same draws
    assert 0.0 <= low["auroc"] <= 1.0 and low["auroc"] == high["auroc"]


def _healthy_token_scores(run, model):
    """Detector probabilities [M, N] of the hold-out slices' tokens and which tokens hold brain pixels."""
    with np.load(run / "data" / "val_slices.npz") as z:
        images = torch.from_numpy(z["images"].astype(np.float32))[:, None]
    with torch.no_grad():
        tokens = load_model(run / "vqvae" / "best.safetensors")[0].encode(images).flatten(1)
        scores = torch.sigmoid(load_model(run / model / "best.safetensors")[0](tokens)).numpy()
    brain = torch.nn.functional.max_pool2d((images > 0).float(), 8).flatten(1).numpy() > 0
    return scores, brain


def test_the_intensity_ablation_restores_with_the_intensity_detector_and_mimood_with_the_atd(tiny):
    from dataclasses import replace

    from mimood.eval.methods import build_methods, load_models
    from mimood.restore import intensity_token_scores

    run, _ = tiny
    names = ["mimood", "mimood_intensity"]
    methods = build_methods(load_models(run, names), names, replace(CFG.restore, T=1), {n: 0.3 for n in names})
    assert [methods[n].cfg.detector for n in names] == ["atd", "intensity"]
    x = np.load(run / "data" / "val_slices.npz")["images"][:4].astype(np.float32)[:, None]   # [4, 1, H, W]
    out = {n: methods[n](x, np.random.default_rng(0)) for n in names}
    np.testing.assert_array_equal(out["mimood_intensity"].token_scores, intensity_token_scores(x))
    assert not np.allclose(out["mimood"].token_scores, intensity_token_scores(x))       # the ATD's probabilities
