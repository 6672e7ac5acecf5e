"""The bundled model (mimood/assets/model) ships with the package: it loads, its manifest and hashes check out,
it stays under 10 MB, and it maps a small volume without any training."""
import json

import nibabel as nib
import numpy as np

from mimood.contract import Manifest
from mimood.runtime.bundle import Bundle
from mimood.runtime.infer import infer_folder
from mimood.runtime.model import BUNDLED, resolve_model
from mimood.testing.fuzz import synthetic_scan


def test_the_bundled_model_is_complete_small_and_calibrated():
    files = [f for f in BUNDLED.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 10_000_000
    assert (BUNDLED / "MODEL_CARD.md").read_text().count("Not for clinical use") == 1
    m = Manifest.load(BUNDLED)
    assert m.verify(BUNDLED) == [] and m.threshold is not None and 0 < m.lam < 1
    assert m.scan_score and m.extra.ood is not None and m.extra.ood.reference["n"] >= 20   # z-scores allowed
    # the shipped detector is the one that beat the ATD in cross-fit; its loop never runs the ATD, so the ATD's
    # fused copy is left out and the MVTM step's fused, row-skipping copy is kept
    assert m.detector == "intensity" and sorted(m.extra.ort_graphs) == ["mvtm_step"]
    assert m.lam_scan_percentile == 80.0                             # each scan at least its own P80 re-sampled
    assert m.residual == "positive"                                  # the map: only brighter than restored
    assert m.contralateral == 0.75                                   # what both hemispheres share, damped
    lines = []
    assert resolve_model(None, say=lines.append).export == BUNDLED and len(lines) == 1
    Bundle.open(BUNDLED)


def test_the_bundled_model_maps_a_small_volume(tmp_path, monkeypatch):
    monkeypatch.delenv("MIMOOD_BUNDLED_MODEL", raising=False)
    scans = tmp_path / "scans"
    scans.mkdir()
    img = synthetic_scan(shape=(80, 96, 8), seed=1)
    nib.save(img, scans / "small.nii.gz")
    report = infer_folder(scans, tmp_path / "maps", resolve_model(None).export, backend="ort", progress=False)
    assert "fused attention: mvtm_step" in report.backend and "rows:" in report.backend
    prov = json.loads(report.provenance.read_text())["manifest"]
    assert (prov["detector"], prov["lam_scan_percentile"], prov["residual"], prov["contralateral"]) == (
        "intensity", 80.0, "positive", 0.75)
    out = nib.load(tmp_path / "maps" / "small.nii.gz")
    m = np.asarray(out.dataobj)
    assert out.shape == img.shape and np.allclose(out.affine, img.affine)
    assert np.isfinite(m).all() and 0 <= m.min() and m.max() <= 1 and m.max() > 0
    assert (np.asarray(img.dataobj) == 0)[m > 0].sum() == 0          # nothing flagged outside the brain
    assert report.path.exists()
