"""`mimood-export` prints the checks of the onnxruntime-only fused-attention graphs (manifest.extra.ort_graphs)
beside those of the standard graphs."""
from click.testing import CliRunner
from test_export_graphs import make_random_run

from mimood.cli.export import main
from mimood.contract import Manifest


def test_export_prints_ort_graph_checks(tmp_path):
    run, out = make_random_run(tmp_path / "run"), tmp_path / "exp"
    r = CliRunner().invoke(main, ["-m", str(run), "-o", str(out), "--batch", "2"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    k = lines.index(f"manifest: {out / 'manifest.json'}")
    assert lines[k + 1].startswith("onnxruntime-only copies (attention fused")
    m = Manifest.load(out)
    assert sorted(m.extra.ort_graphs) == ["atd", "mvtm_step"]
    for line, name in zip(lines[k + 2:], ("atd", "mvtm_step")):
        words = line.split()
        assert words[:2] == [f"{name}.ort.onnx", "fp32"]
        assert "FAIL" not in line and "not validated" not in line
        assert all(c["passed"] for c in m.validation[f"{name}.ort"])
    assert "probs |err|" in lines[k + 2]                     # ATD: probabilities as max |err| ...
    assert "differ" in lines[k + 3]                          # ... the step: share of draws that differ
    assert len(lines) == k + 4
