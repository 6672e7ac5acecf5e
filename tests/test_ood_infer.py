"""The OOD scan score end to end: `mimood-train ood` fits it into the run, `export_run` copies the statistics and
an ONNX feature graph into the export (checked by hash), and `infer_folder` reports it as report.csv's scan score
(the anomaly-map score in its own column), equal to the PyTorch reference computed from the run folder.

The run is tiny and real: random-initialised tiny-preset models (the VQ-VAE's codebook set to encoder outputs of
brain positions, so that the brain gets many codes, as after training), three synthetic NIfTI volumes as training
data (slice cache and tokens made by the training recipe's own functions), then the OOD fit.
"""
import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from mimood.config import preset
from mimood.data.preprocess import preprocess
from mimood.errors import InputError
from mimood.models.checkpoint import build_model, load_model, save_model
from mimood.ood.features import FeatureGraph, mvtm_features
from mimood.ood.mirror import mirror_slices
from mimood.ood.scan import OOD_FILE, OODScorer, brain_share
from mimood.runtime import infer_folder
from mimood.runtime.bundle import Bundle
from mimood.runtime.reference import HealthyReference

B, R = 4, 2
AFFINE = np.diag([1.0, 1.0, 1.5, 1.0])


def write_volume(path, seed, shape=(48, 56, 12)):
    """A textured ellipsoid 'brain' (background 0) with a brighter core."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r2 = x ** 2 + y ** 2 + (z / 1.2) ** 2
    data = np.where(r2 <= 0.8, rng.uniform(50, 120, shape) + 60 * (r2 < 0.2), 0).astype(np.float32)
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with random tiny models, slices and tokens of 3 synthetic volumes, and its OOD fit."""
    from mimood.train.recipes import prepare_slices, tokenize, train

    root = tmp_path_factory.mktemp("oodinfer")
    data, run = root / "data", root / "run"
    data.mkdir()
    for i in range(3):
        write_volume(data / f"v{i}.nii.gz", seed=i)
    cfg = preset("tiny")
    run.mkdir()
    cfg.save(run / "config.json")
    torch.manual_seed(0)
    for kind, c in (("atd", cfg.transformer), ("mvtm", cfg.transformer)):
        save_model(build_model(kind, c), run / kind / "best.safetensors", kind)
    vq = build_model("vqvae", cfg.vqvae)
    x = torch.from_numpy(np.concatenate([preprocess(p, cfg.data).images for p in sorted(data.iterdir())]))[:, None]
    with torch.no_grad():
        z = vq.net.encode(x.float())                                         # [S, D, 20, 20]
        brain = torch.nn.functional.avg_pool2d((x > 0).float(), 8).flatten() > 0.5
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])[brain]          # latents of brain tokens
        pick = torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))[:cfg.vqvae.num_embeddings]
        vq.quantizer.embedding.weight.copy_(flat[pick])
    save_model(vq, run / "vqvae" / "best.safetensors", "vqvae")
    train_set, val_set = prepare_slices(run, cfg, [data], val_fraction=0.34, progress=False)
    tokenize(run, cfg, train_set, val_set, progress=False)
    summary = train("ood", run, cfg, [data], resume=True, progress=False)
    return run, summary


@pytest.fixture(scope="module")
def export(run, tmp_path_factory):
    from mimood.export.export import export_run

    out = tmp_path_factory.mktemp("oodexport") / "export"
    export_run(run[0], out=out, batch=B, R=R, validate=False, build_engines=False, progress=False)
    return out


def test_train_ood_stage_writes_statistics_and_summary(run):
    run, summary = run
    scorer = OODScorer.load(run)
    assert (run / OOD_FILE).is_file()
    assert summary["ood"]["scan_score"] == scorer.scan_score_name
    assert summary["ood"]["tokens"] == scorer.meta["fit"]["tokens"] > 0
    assert json.loads((run / "summary.json").read_text())["ood"] == summary["ood"]
    # resuming keeps statistics fitted on this very MVTM
    from mimood.train.recipes import train
    before = (run / OOD_FILE).stat().st_mtime_ns
    again = train("ood", run, preset("tiny"), [run.parent / "data"], resume=True, progress=False)
    assert again["ood"] == summary["ood"] and (run / OOD_FILE).stat().st_mtime_ns == before


def test_export_records_the_scan_score_and_checks_its_files(run, export, tmp_path):
    bundle = Bundle.open(export)
    m = bundle.manifest
    scorer = OODScorer.load(run[0])
    assert m.scan_score == scorer.scan_score_name == m.extra.ood.scan_score
    assert m.extra.ood.aggregation == scorer.meta["aggregation"]
    assert m.extra.ood.graph.inputs == {"tokens": [[B, 400], "int32"]}
    assert (export / OOD_FILE).read_bytes() == (run[0] / OOD_FILE).read_bytes()

    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    raw = bytearray((bad / OOD_FILE).read_bytes())
    raw[-1] ^= 1                                                            # one flipped bit in the statistics
    (bad / OOD_FILE).write_bytes(bytes(raw))
    with pytest.raises(InputError, match="OOD statistics differs"):
        Bundle.open(bad)


def test_onnx_features_match_pytorch(run, export):
    from mimood.runtime.ood import OODRuntime

    ood = OODRuntime.open(export, Bundle.open(export).manifest.extra.ood)
    mvtm, _ = load_model(run[0] / "mvtm" / "best.safetensors")
    graph = FeatureGraph(mvtm, ood.scorer.meta["pass_type"])
    tokens = np.load(run[0] / "data" / "tokens.npz")["val"][:B + 3].astype(np.int32)   # two batches, padded
    np.testing.assert_allclose(ood.features(tokens), mvtm_features(graph, tokens), atol=1e-4)


def test_report_scan_score_is_the_ood_score(run, export, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write_volume(inp / "scan.nii.gz", seed=7)
    report = infer_folder(inp, out, export, backend="ort", progress=False)
    assert not report.failures
    with open(out / "report.csv", newline="") as f:
        row = next(csv.DictReader(f))

    # reference: the same slices through the run's PyTorch models and the scorer fitted in the run
    scorer = OODScorer.load(run[0])
    cfg = Bundle.open(export).data_config()
    s = preprocess(inp / "scan.nii.gz", cfg)
    vq, _ = load_model(run[0] / "vqvae" / "best.safetensors")
    with torch.no_grad():
        tokens = vq.encode(torch.from_numpy(s.images[:, None].astype(np.float32))).flatten(1).numpy()
        mirrored = vq.encode(torch.from_numpy(mirror_slices(s.images)[:, None].astype(np.float32))).flatten(1).numpy()
    res = scorer.score(tokens, brain_share(s.images > 0), mirrored)
    want = res.scan[scorer.scan_score_name]
    assert scorer.scan_score_name == "mirror" and res.scan["mirror"] > 0
    assert row["score_name"] == f"ood.{scorer.scan_score_name}"
    assert float(row["raw_score"]) == pytest.approx(want, rel=1e-4, abs=1e-5)
    ref = HealthyReference(scorer.meta["reference"]["mirror"])              # the fit's healthy validation scans
    assert int(row["reference_scans"]) == ref.n >= 1
    assert float(row["scan_score"]) == pytest.approx(ref.calibrate(float(row["raw_score"])), abs=1e-9)
    assert 0 < float(row["scan_score"]) < 1
    amap = np.asarray(nib.load(str(out / "scan.nii.gz")).dataobj)
    assert 0 < float(row["map_score"]) <= amap.max() + 1e-6               # the map score kept as its own column
    prov = json.loads((out / "provenance.json").read_text())
    scan = prov["scans"][str(inp / "scan.nii.gz")]
    assert scan["ood"]["value"] == pytest.approx(want, rel=1e-4, abs=1e-5) and "z" not in scan["ood"]
    assert scan["score"]["z"] is None and scan["score"]["percentile"] is None            # ref.n < 20
    assert scan["score"]["omitted"].startswith("z-score and percentile need at least 20")


def test_ood_runtime_needs_no_torch():
    code = ("import sys, mimood.runtime.ood; bad = [m for m in sys.modules if m == 'torch' or "
            "m.startswith('mimood.train')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ood_scan_score_in_the_runtime_only_install(run, export, tmp_path):
    """The OOD scan score with torch, MONAI, scikit-learn and matplotlib impossible to import
    (tests/test_runtime_only.py's blocker): the same score as with them."""
    from test_runtime_only import infer

    inp = tmp_path / "in"
    inp.mkdir()
    write_volume(inp / "scan.nii.gz", seed=7)
    res = infer([str(inp), "-o", str(tmp_path / "lean"), "-m", str(export), "--backend", "ort"])
    assert res.returncode == 0, res.stderr
    infer_folder(inp, tmp_path / "full", export, backend="ort", progress=False)
    rows = []
    for out in ("lean", "full"):
        with open(tmp_path / out / "report.csv", newline="") as f:
            rows.append(next(csv.DictReader(f)))
    assert rows[0]["score_name"] == rows[1]["score_name"] == "ood.mirror"
    assert float(rows[0]["raw_score"]) == pytest.approx(float(rows[1]["raw_score"]), rel=1e-6)
    assert float(rows[0]["scan_score"]) == pytest.approx(float(rows[1]["scan_score"]), abs=1e-6)


def test_eval_tables_on_a_labelled_folder(run, tmp_path):
    from mimood.eval.ood import eval_tables

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    for name, seed, lesion in (("healthy", 3, False), ("lesion", 4, True)):
        write_volume(data / "images" / f"{name}.nii.gz", seed=seed)
        label = np.zeros((48, 56, 12), np.uint8)
        if lesion:
            label[20:28, 24:32, 4:8] = 1
        nib.save(nib.Nifti1Image(label, AFFINE), str(data / "labels" / f"{name}.nii.gz"))
    table, text = eval_tables(run[0], data, slice_stride=2, progress=False)
    assert table["counts"]["scans"] == 2 and table["counts"]["lesion_scans"] == 1
    assert table["counts"]["lesion_slices"] > 0 and table["scan_score"] == OODScorer.load(run[0]).scan_score_name
    assert {"vim", "residual", "mahalanobis", "knn", "nll", "mirror", "atd", "map"} <= set(table["scan"]) == set(table["slice"])
    assert all(set(m) == {"auroc", "aupr", "fpr95"} for m in table["scan"].values())
    assert set(table["token"]["nll"]) == {"ap", "auroc"} and "map" not in table["token"]
    json.dumps(table, allow_nan=False)                                      # strict JSON: no NaN left
    assert "nll" in text and "map" in text
