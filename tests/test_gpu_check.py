"""benchmarks/gpu_check.sh is known to work before a GPU machine is lent: its --dry-run runs every path this machine
can run (tiny preset, batch 2 x R 2, T 2) and writes the JSON the real check writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_the_results_file(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SITE": str(tmp_path / "site")}
    env.pop("OUT", None)
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out), "--quiet"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    j = json.loads(out.read_text())
    s = j["settings"]
    assert (s["preset"], s["batch"], s["R"], s["T"], s["dry_run"], s["early_stop"]) == ("tiny", 2, 2, 2, True, False)
    ran = {r["path"]: r for r in j["results"]}
    assert "torch fp32 eager" in ran and "torch fp32 compile" in ran
    for r in ran.values():
        assert r["seconds_per_batch"] > 0 and len(r["seconds_all"]) == 1
        assert r["seconds_per_32_slices"] == r["seconds_per_batch"] * 16
        assert set(r["stages"]) == {"encode", "detect", "mvtm_step", "decode_score", "host"}
    # the compiled modules compute what the eager ones do (same noise: same maps)
    assert ran["torch fp32 compile"]["maps_vs_eager"]["max_abs"] < 1e-5
    skipped = {s["path"]: s["reason"] for s in j["skipped"]}
    if j["machine"]["device"] == "cpu":
        assert "CUDA" in skipped["torch fp32 cuda-graphs"] and not j["checks"]
    assert j["paper"]["seconds_per_32_slices"] == 9.5 and j["versions"]["torch"]
    assert j["fastest"]["path"] in ran


def test_card_names_make_file_names():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import card_slug

    assert card_slug("NVIDIA H200") == "nvidia_h200" and card_slug("NVIDIA GeForce RTX 3090") == "nvidia_geforce_rtx_3090"
