"""`mimood-bench`: FLOPs counted against a hand count, and the JSON contract of a tiny run on this machine."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mimood.bench import loop_flops
from mimood.cli.bench import main
from mimood.config import preset
from mimood.models.checkpoint import build_model
from mimood.runtime.torch_backend import TorchEngine


def test_loop_flops_per_iteration_match_hand_count():
    """One more iteration costs one ATD and one MVTM pass: per layer 24 M N w^2 (qkv, proj, MLP) + 4 M N^2 w
    (attention scores and values: the CPU attention kernel must be counted), heads 2 M N w (1 + K)."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    m = {k: build_model(k, cfg.vqvae if k == "vqvae" else cfg.transformer) for k in ("vqvae", "atd", "mvtm")}
    engine = TorchEngine(m["vqvae"], m["atd"], m["mvtm"], cfg.restore)
    x = np.random.default_rng(0).random((2, 1, 160, 160), dtype=np.float32)
    M, N, w = 2 * cfg.restore.R, 400, cfg.transformer.width
    L, K = cfg.transformer.depth, cfg.transformer.vocab_size
    per_iteration = 2 * L * (24 * M * N * w * w + 4 * M * N * N * w) + 2 * M * N * w * (1 + K)
    f1, f3 = loop_flops(engine, x, 1), loop_flops(engine, x, 3)
    assert f3 - f1 == 2 * per_iteration
    assert f1 > per_iteration                      # + encoder and decoder convolutions


def test_bench_json_contract(tmp_path):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(main, ["--preset", "tiny", "--batch", "2", "-R", "1", "-T", "1", "--repeats", "2",
                                  "--ar-positions", "2", "--no-volume", "--backends", "ort-fp32", "--backends", "ort-int8",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert {"machine", "results", "ratios"} <= set(d)
    assert d["machine"]["cores"] >= 1 and d["machine"]["peak_flops"]["fp32"] > 1e8
    gpu = torch.cuda.is_available()
    paths = [x["path"] for x in d["results"]]
    assert paths[0] == f"torch fp32 {'cuda' if gpu else 'cpu'} eager"
    if not gpu:
        assert paths == ["torch fp32 cpu eager", "ort fp32 cpu", "ort int8 cpu"]
        assert "(int8: atd, mvtm_step)" in d["results"][2]["engine"]      # the int8 copies, not fp32 again
    flops = {x["flops_per_batch"] for x in d["results"]}
    assert len(flops) == 1 and flops.pop() > 0     # the same work on every path
    for x in d["results"]:
        assert len(x["seconds_all"]) == 2 and x["seconds_per_batch"] == pytest.approx(np.median(x["seconds_all"]))
        assert x["slices_per_second"] == pytest.approx(2 / x["seconds_per_batch"])
        assert x["achieved_flops"] == pytest.approx(x["flops_per_batch"] / x["seconds_per_batch"])
        assert 0 < x["peak_share"] < 2
        assert 0 < sum(x["stages"].values()) <= x["seconds_per_batch"] * 1.01
        assert x["volume_seconds"] is None
    ref, best = d["results"][0], min(d["results"][1:], key=lambda x: x["seconds_per_batch"])
    rounds = [a / b for a, b in zip(ref["seconds_all"], best["seconds_all"])]     # interleaved rounds
    assert d["ratios"]["runtime_vs_torch_eager"] == pytest.approx(np.median(rounds))
    assert d["ratios"]["runtime_best_path"] == best["path"]
    assert d["ar"]["positions_timed"] == 2 and d["ar"]["fast_passes"] >= 1
    around = np.mean(d["ar"]["reference_seconds_around"])      # the reference timed again around AR
    assert d["ratios"]["mimood_vs_ar"] == pytest.approx(d["ar"]["seconds_per_batch"] / around)
    assert d["ratios"]["mimood_vs_ar"] > 1         # 400 transformer passes against 2 (T = 1)
    skipped = {s["path"]: s["reason"] for s in d["skipped"]}
    if not gpu:
        assert skipped["torch fp16"].startswith("no CUDA GPU")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert skipped["trt fp16"] == "tensorrt not installed"
    assert "torch fp32 cpu eager" in r.stdout and f"json: {out}" in r.stdout
