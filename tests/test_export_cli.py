"""`mimood-export` through click: its summary lines, overrides reaching the manifest, exit codes 1 (a graph
fails its check) and 2 (bad run folder) with one-line errors."""
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from test_export_graphs import make_random_run

from mimood.cli.export import main
from mimood.contract import Manifest
from mimood.data.slices import load_slice_set
from mimood.export import export as ex


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_random_run(tmp_path_factory.mktemp("cli") / "run")


def test_export_without_validation_and_overrides(run, tmp_path):
    out = tmp_path / "exp"
    r = CliRunner().invoke(main, ["-m", str(run), "-o", str(out), "--batch", "2", "-R", "3", "-T", "5",
                                  "--lam", "0.01", "--no-validate"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "graphs for batch 2 x R 3 (T 5, detector atd, lambda 0.01):"
    assert [ln.split()[:3] for ln in lines[1:5]] == [
        [f"{g}.onnx", "fp32", "not"] for g in ("encode", "atd", "mvtm_step", "decode_score")]
    assert "TensorRT" in lines[5]
    assert lines[6] == f"manifest: {out / 'manifest.json'}"
    m = Manifest.load(out)
    assert (m.batch, m.R, m.T, m.lam, m.threshold, m.validation) == (2, 3, 5, 0.01, 0.2, {})
    assert m.graphs["mvtm_step"]["inputs"]["mask"] == [[6, 400], "bool"]
    assert m.verify(out) == []


def test_failed_check_exits_1(run, tmp_path, monkeypatch):
    strict = ex.Tolerances(**{**ex.TOLERANCES["fp32"].__dict__, "token_mismatch": -1.0})
    monkeypatch.setitem(ex.TOLERANCES, "fp32", strict)
    r = CliRunner().invoke(main, ["-m", str(run), "-o", str(tmp_path / "exp"), "--batch", "2"])
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: encode.onnx does not match PyTorch: FAIL tokens")
    assert not (tmp_path / "exp").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, problem", [
    ("missing", "run folder not found"),
    ("config", "config.json: not a valid run config"),
    ("vqvae", "vqvae/best.safetensors: checkpoint not found"),
])
def test_bad_run_folder_exits_2(run, tmp_path, damage, problem):
    bad = tmp_path / "run"
    if damage != "missing":
        shutil.copytree(run, bad)
    if damage == "config":
        (bad / "config.json").write_text('{"preset": "tiny", "no_such_key": 1}')
    if damage == "vqvae":
        (bad / "vqvae" / "best.safetensors").unlink()
    r = CliRunner().invoke(main, ["-m", str(bad)])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and problem in r.stderr
    assert r.stderr.startswith("error: ")


def test_intensity_detector_reaches_the_manifest_and_every_backend(run, tmp_path):
    from mimood.restore import intensity_token_scores, restore
    from mimood.runtime.infer import load_engine
    from test_export_graphs import LAM

    own, out = tmp_path / "run", tmp_path / "exp"
    shutil.copytree(run, own)
    r = CliRunner().invoke(main, ["-m", str(own), "-o", str(out), "--batch", "2", "--detector", "intensity"])
    assert r.exit_code == 2 and not out.exists()                       # not calibrated for it: one line, no folder
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "methods.mimood_intensity" in r.stderr
    cal = json.loads((own / "calibration.json").read_text())
    cal["methods"] = {"mimood_intensity": {"lam": 0.5, "threshold": 0.3, "residual": "positive"}}
    (own / "calibration.json").write_text(json.dumps(cal))
    r = CliRunner().invoke(main, ["-m", str(own), "-o", str(out), "--batch", "2", "--detector", "intensity"])
    assert r.exit_code == 0, r.output                                  # decode_score validated with "positive"
    assert r.stdout.startswith("graphs for batch 2 x R 2 (T 2, detector intensity, lambda 0.5):")
    m = Manifest.load(out)
    assert (m.detector, m.lam, m.threshold, m.residual) == ("intensity", 0.5, 0.3, "positive")
    assert m.extra.validation.lam == LAM                               # the ATD graph is still checked at its own
    images = load_slice_set(own / "data" / "val_slices.npz").images.astype(np.float32)
    x = images[np.argsort((images > 0).sum((1, 2)))[-2:]][:, None]     # the two slices with most brain [2,1,H,W]
    want = 2 * int((intensity_token_scores(x) > 0.5).sum())           # R copies of the bright tokens
    got = {}
    for backend in ("ort", "torch"):
        engine = load_engine(out, backend=backend)
        cfg = engine.bundle.restore_config()
        assert cfg.detector == "intensity" and cfg.residual == "positive"
        got[backend] = restore(engine, x, cfg, np.random.default_rng(0), keep_tokens=True)
        assert got[backend].masked == [want, want] and want > 0
    assert np.mean(got["ort"].tokens == got["torch"].tokens) > 0.99
    assert np.abs(got["ort"].maps - got["torch"].maps).mean() < 1e-3


def _export_intensity(run, tmp_path, entry: dict):
    """A copy of the run whose calibration has only this mimood_intensity entry, exported with the intensity
    detector (batch 4, unvalidated); returns (the run copy, the export folder)."""
    own, out = tmp_path / "run", tmp_path / "exp"
    shutil.copytree(run, own)
    cal = json.loads((own / "calibration.json").read_text())
    cal["methods"] = {"mimood_intensity": entry}
    (own / "calibration.json").write_text(json.dumps(cal))
    r = CliRunner().invoke(main, ["-m", str(own), "-o", str(out), "--batch", "4", "--detector", "intensity",
                                  "--no-validate"])
    assert r.exit_code == 0, r.output
    return own, out


def test_per_scan_lambda_reaches_the_manifest_and_packing_keeps_each_scan_its_own(run, tmp_path):
    from mimood.restore import scan_lambda
    from mimood.runtime.batching import Packer, infer_slices, run_batch
    from mimood.runtime.infer import load_engine

    own, out = _export_intensity(run, tmp_path, {"lam": 0.9, "threshold": 0.3, "lam_scan_percentile": 90.0})
    m = Manifest.load(out)
    assert (m.detector, m.lam, m.lam_scan_percentile) == ("intensity", 0.9, 90.0)
    engine = load_engine(out, backend="ort")
    cfg = engine.bundle.restore_config()
    assert cfg.lam_scan_percentile == 90.0
    images = load_slice_set(own / "data" / "val_slices.npz").images.astype(np.float32)
    a = images[np.argsort((images > 0).sum((1, 2)))[-3:]]                     # one scan: 3 slices
    b = (a * 0.6).astype(np.float32)                                          # another scan, darker: lower lambda
    la, lb = scan_lambda(a, cfg), scan_lambda(b, cfg)
    assert lb < la < 0.9
    alone = {k: infer_slices(engine, v, cfg) for k, v in (("a", a), ("b", b))}
    packer = Packer(engine.batch)                                             # both scans in the same batches
    packer.add("a", a, la)
    packer.add("b", b, lb)
    mixed = {"a": np.zeros_like(a), "b": np.zeros_like(b)}
    for batch in packer.flush():
        assert batch.lams is not None and np.isinf(batch.lams[len(batch.rows):]).all()
        for (k, i), mp in zip(batch.rows, run_batch(engine, batch, cfg, 0)):
            mixed[k][i] = mp
    for k in ("a", "b"):
        np.testing.assert_allclose(mixed[k], alone[k], atol=1e-5)
    assert np.abs(alone["b"] - infer_slices(engine, b, replace(cfg, lam_scan_percentile=None))).max() > 1e-3


def test_contralateral_reaches_the_manifest_and_the_export_threshold_is_chosen_on_its_maps(run, tmp_path):
    from mimood.eval.calibrate import export_threshold
    from mimood.runtime.batching import infer_slices
    from mimood.runtime.infer import load_engine

    own, out = _export_intensity(run, tmp_path, {"lam": 0.5, "threshold": 0.3, "lam_scan_percentile": 90.0,
                                                 "contralateral": 0.75})
    m = Manifest.load(out)
    assert m.contralateral == 0.75 and m.threshold == 0.3
    engine = load_engine(out, backend="ort")
    cfg = engine.bundle.restore_config()
    assert cfg.contralateral == 0.75
    val = own / "data" / "val_slices.npz"
    damped = export_threshold(out, val, slice_stride=1, progress=False)
    plain = export_threshold(out, val, replace(cfg, contralateral=0.0), slice_stride=1, progress=False)
    assert 0 < damped["threshold"] < plain["threshold"]              # the same draws, pointwise lower maps
    assert damped["flagged_share"] == pytest.approx(0.01, abs=0.003)
    # the threshold is the P99 of exactly the maps the runtime writes for each held-out volume
    s = load_slice_set(val)
    maps = [infer_slices(engine, s.images[s.case == v].astype(np.float32), cfg) for v in np.unique(s.case)]
    values = np.concatenate([mp[s.images[s.case == v] > 0] for mp, v in zip(maps, np.unique(s.case))])
    assert damped["threshold"] == pytest.approx(float(np.percentile(values, 99)), rel=1e-5)
