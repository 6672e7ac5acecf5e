"""The runtime-only install (`pip install mimood`, no extras): `mimood-infer` maps scans with onnxruntime where
torch, MONAI, scikit-learn, matplotlib and the exporter's onnx/onnxscript cannot be imported at all.

Each check runs in a fresh interpreter whose `sys.meta_path` starts with a finder that refuses those packages
(`ModuleNotFoundError`, as on a machine without them), so a lazy import anywhere on the path fails the run.
The tiny export is made beforehand in this process, which has them.
"""
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from test_infer import write_scan
from test_runtime import tiny_export_folder

BLOCKED = ("torch", "monai", "sklearn", "matplotlib", "onnx", "onnxscript", "einops", "modelopt")
BLOCKER = f"""
import sys

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: runtime-only test)", name=name)
        return None

sys.meta_path.insert(0, _Blocked())
try:
    import torch
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the blocker does not work")
"""


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=300)


def infer(args: list[str]) -> subprocess.CompletedProcess:
    return run_blocked(f"from mimood.cli.infer import main\nmain({args!r})")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return tiny_export_folder(tmp_path_factory)


def test_ort_backend_maps_a_scan_without_torch_monai_sklearn_or_matplotlib(export, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    data = write_scan(inp / "a.nii.gz")
    res = infer([str(inp), "-o", str(out), "-m", str(export), "--backend", "ort"])
    assert res.returncode == 0, res.stderr
    amap = np.asarray(nib.load(str(out / "a.nii.gz")).dataobj)
    assert amap.shape == data.shape and amap.max() > 0 and (amap[data == 0] == 0).all()
    assert (out / "a_mask.nii.gz").is_file() and (out / "report.csv").is_file()
    assert not list(out.glob("*.png"))                                      # no matplotlib: no overlay
    assert res.stderr.count("matplotlib is not installed: no PNG overlays") == 1
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["backend_used"].startswith("ort fp32 CPUExecutionProvider") and prov["finished"]

    again = infer([str(inp), "-o", str(out), "-m", str(export), "--continue"])   # auto picks ort
    assert again.returncode == 0, again.stderr
    assert "1 finished scans skipped" in again.stderr                      # finished without its PNG
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["backend_reason"] == "torch not installed: onnxruntime"


def test_torch_backend_without_torch_is_a_one_line_error(export, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    write_scan(inp / "a.nii.gz")
    res = infer([str(inp), "-o", str(tmp_path / "out"), "-m", str(export), "--backend", "torch"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "error: the torch backend needs PyTorch" in res.stderr


def test_help_imports_none_of_the_training_stack():
    """Not blocked: in the full environment, `mimood-infer --help` still loads none of them."""
    code = ("import sys\nfrom mimood.cli.infer import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in sys.modules if m.partition('.')[0] in {BLOCKED!r}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--backend" in res.stdout and res.stdout.strip().splitlines()[-1] == "[]"


def test_exporting_a_run_without_the_export_extra_is_a_one_line_error(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "in").mkdir()
    res = infer([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "run")])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "exporting needs the export extra" in res.stderr and "mimood[export]" in res.stderr
