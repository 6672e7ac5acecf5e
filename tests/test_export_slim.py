"""mimood.export.slim: the bundled model's smaller copy of an export maps a scan exactly as the full export does,
and what it dropped fails in one line."""
import nibabel as nib
import numpy as np
import pytest

from mimood.contract import Manifest
from mimood.errors import InputError
from mimood.export.export import export_run
from mimood.export.slim import slim_copy
from mimood.runtime.bundle import Bundle
from mimood.runtime.infer import infer_folder
from mimood.testing.fuzz import synthetic_scan
from test_export_graphs import make_random_run


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("slim")
    run = make_random_run(root / "run")
    export_run(run, batch=4, progress=False)
    full, slim = run / "export", root / "slim"
    slim.mkdir()
    (slim / "MODEL_CARD.md").write_text("card\n")
    nbytes = slim_copy(full, slim, drop=("weights",))
    return root, full, slim, nbytes


def test_slim_copy_drops_the_checkpoints_keeps_the_graphs_and_other_files(exports):
    _, full, slim, nbytes = exports
    m_full, m = Manifest.load(full), Manifest.load(slim)
    assert m_full.extra.weights and not m.extra.weights and not (slim / "weights").exists()
    assert m.graphs == m_full.graphs and m.extra.ort_graphs == m_full.extra.ort_graphs
    assert (slim / "MODEL_CARD.md").read_text() == "card\n"          # not the copy's to remove
    assert nbytes == sum(f.stat().st_size for f in slim.rglob("*") if f.is_file() and f.name != "MODEL_CARD.md")
    full_bytes = sum(f.stat().st_size for f in full.rglob("*") if f.is_file())
    assert nbytes < full_bytes
    slim_copy(full, slim, drop=("weights", "ort_graphs"))            # again, smaller: old files replaced
    assert not list(slim.glob("*.ort.onnx")) and Manifest.load(slim).verify(slim) == []
    slim_copy(full, slim, drop=("weights", "ort_graphs.atd"))      # one step's fused copy
    assert sorted(Manifest.load(slim).extra.ort_graphs) == ["mvtm_step"] and not (slim / "atd.ort.onnx").exists()
    assert Manifest.load(slim).verify(slim) == []
    slim_copy(full, slim, drop=("weights",))
    with pytest.raises(ValueError, match="only"):
        slim_copy(full, slim, drop=("graphs",))
    with pytest.raises(ValueError, match="only"):
        slim_copy(full, slim, drop=("ort_graphs.encode",))


def test_the_slim_copy_maps_a_scan_like_the_full_export_and_torch_says_why_not(exports):
    root, full, slim, _ = exports
    scans = root / "scans"
    scans.mkdir()
    nib.save(synthetic_scan(shape=(64, 72, 12), seed=3), scans / "s.nii.gz")
    maps = {}
    for name, export in (("full", full), ("slim", slim)):
        infer_folder(scans, root / f"maps_{name}", export, backend="ort", progress=False)
        maps[name] = np.asarray(nib.load(root / f"maps_{name}" / "s.nii.gz").dataobj)
    assert maps["full"].shape == (64, 72, 12) and np.array_equal(maps["full"], maps["slim"])
    with pytest.raises(InputError, match="checkpoint not found in the export folder"):
        Bundle.open(slim).weights("vqvae")
