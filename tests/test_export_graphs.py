"""`export_run` on a tiny run: the four graphs (fp32 and fp16) against their PyTorch modules in
onnxruntime, the restoration loop driven by the graphs against the PyTorch engine, the manifest, and
clean failures (bad run folders, a failed check that must leave the previous export untouched).

The run is made from random-weight tiny-preset models saved with `save_model` (training even the tiny
preset takes minutes on 2 cores), real slices (the shipped MNI152 template, preprocessed), and a
calibration.json. The ATD's head is set to give logits of logit(lambda) +- 1, so a share of the tokens
score above lambda (~17% here) and the loop masks some tokens and keeps others.
"""
import json
import math
import shutil
from importlib import resources

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mimood.config import preset
from mimood.contract import Manifest, file_sha256
from mimood.data.preprocess import preprocess
from mimood.data.slices import SliceSet, save_slice_set
from mimood.errors import InputError
from mimood.export import export as ex
from mimood.export.fp16 import node_precisions
from mimood.export.graphs import GRAPHS, build_modules
from mimood.models.checkpoint import build_model, load_model, save_model
from mimood.restore import restore
from mimood.runtime.torch_backend import TorchEngine

B = 4
LAM = 0.004          # calibration.json's lambda (the config's is 0.005: the calibrated one must win)
THRESHOLD = 0.2


def make_random_run(run, lam=LAM):
    """A run folder with random tiny-preset models, real validation slices and a calibration."""
    cfg = preset("tiny")
    run.mkdir(parents=True)
    cfg.save(run / "config.json")
    torch.manual_seed(0)
    for kind, c in (("vqvae", cfg.vqvae), ("atd", cfg.transformer), ("mvtm", cfg.transformer)):
        model = build_model(kind, c)
        if kind == "atd":   # logits ~ logit(lam) +- 1: some tokens above lam, most below
            model.head.weight.data.mul_(10)
            model.head.bias.data.fill_(math.log(lam / (1 - lam)))
        (run / kind).mkdir()
        save_model(model, run / kind / "best.safetensors", kind)
    template = resources.files("mimood.data") / "assets" / "mni152_t2_1mm_brain_template.nii.gz"
    s = preprocess(template, cfg.data)
    n = len(s.images)
    (run / "data").mkdir()
    save_slice_set(SliceSet(s.images.astype(np.float16), np.zeros(n, np.int64), s.index, ["mni152"]),
                   run / "data" / "val_slices.npz")
    (run / "calibration.json").write_text(json.dumps({"lam": lam, "threshold": THRESHOLD}))
    return run


def make_perturbed_run(run):
    """`make_random_run` with every ATD and MVTM parameter (but the ATD's head, which keeps some tokens above
    lambda and some below) moved off its initial value: freshly initialised Linear biases are zero and LayerNorms
    the identity, so a graph rewrite taking a bias from the wrong place would go unnoticed."""
    run = make_random_run(run)
    g = torch.Generator().manual_seed(1)
    for kind in ("atd", "mvtm"):
        path = run / kind / "best.safetensors"
        model, _ = load_model(path)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if not (kind == "atd" and n.startswith("head")):
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        save_model(model, path, kind)
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = make_random_run(tmp_path_factory.mktemp("export") / "run")
    manifest = ex.export_run(run, batch=B, fp16=True, progress=False)
    return run, run / "export", manifest


def _models(run):
    return {k: load_model(run / k / "best.safetensors")[0] for k in ("vqvae", "atd", "mvtm")}


def test_export_folder_and_manifest(exported):
    run, out, m = exported
    assert m == Manifest.load(out) and m.verify(out) == []
    assert (m.preset, m.batch, m.R, m.T, m.lam, m.threshold) == ("tiny", B, 2, 2, LAM, THRESHOLD)
    assert (m.vocab_size, m.mask_id, m.grid, m.scan_score) == (32, 32, 20, None)
    assert m.data["clip_high"] == 98.0 and m.min_pool == 3 and m.avg_pool == 7
    assert sorted(m.graphs) == sorted([*GRAPHS, *(f"{g}.fp16" for g in GRAPHS)])
    io = {  # the contract with the runtime
        "encode": ({"x": [[B, 1, 160, 160], "float32"]}, {"tokens": [[B, 400], "int32"]}),
        "atd": ({"tokens": [[B * 2, 400], "int32"]}, {"probs": [[B * 2, 400], "float32"]}),
        "mvtm_step": ({"tokens": [[B * 2, 400], "int32"], "mask": [[B * 2, 400], "bool"],
                       "noise": [[B * 2, 400], "float32"]}, {"tokens_out": [[B * 2, 400], "int32"]}),
        "decode_score": ({"tokens": [[B * 2, 400], "int32"], "x": [[B, 1, 160, 160], "float32"]},
                         {"maps": [[B, 160, 160], "float32"]}),
    }
    for name, (inputs, outputs) in io.items():
        for key, precision in ((name, "fp32"), (f"{name}.fp16", "fp16")):
            g = m.graphs[key]
            assert (g["file"], g["precision"]) == (f"{key}.onnx", precision)
            assert (g["inputs"], g["outputs"]) == (inputs, outputs), key
            assert all(c["passed"] for c in m.validation[key]) and m.validation[key], key
            onnx.checker.check_model(str(out / g["file"]))
    assert m.extra.validation.blob_slices == B // 2 and 0 < m.extra.validation.mask_share <= 1
    for k in ("vqvae", "atd", "mvtm"):
        w = m.extra.weights[k]
        assert file_sha256(out / w.file) == w.sha256 == file_sha256(run / k / "best.safetensors")
    if not _has_tensorrt():
        assert m.extra.engines == "TensorRT not available: tensorrt not installed; ONNX graphs written"
    assert not list(out.parent.glob(".export.*"))     # no temporary folder left


def _has_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def test_fp16_graphs_are_half_precision_where_intended(exported):
    _, out, m = exported
    for name in GRAPHS:
        assert m.extra.fp16[f"{name}.fp16"]["nodes_fp16"] > 0, name
    enc = onnx.load(str(out / "encode.fp16.onnx"))
    prec = {n.op_type: node_precisions(enc).get(n.name) for n in enc.graph.node}
    assert prec["Conv"] == "fp16" and prec["MatMul"] == prec["ArgMin"] == "fp32"   # VQ search in fp32
    dec = onnx.load(str(out / "decode_score.fp16.onnx"))
    prec = node_precisions(dec)
    for n in dec.graph.node:
        if n.op_type in ("ConvTranspose", "Conv"):
            assert prec[n.name] == "fp16", n.name
        if n.op_type in ("Sub", "Abs", "MaxPool", "AveragePool", "ReduceMean"):
            assert prec[n.name] == "fp32", n.name                                    # residual tail in fp32
    atd = onnx.load(str(out / "atd.fp16.onnx"))
    prec = node_precisions(atd)
    assert {prec[n.name] for n in atd.graph.node if n.op_type == "LayerNormalization"} == {"fp32"}
    assert {prec[n.name] for n in atd.graph.node if n.op_type == "Softmax"} == {"fp32"}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graphs_match_pytorch_on_other_slices(exported, precision):
    """Fresh inputs (other slices, another mask and noise) than the export's own check."""
    run, out, m = exported
    cfg = preset("tiny").restore
    modules = build_modules(*_models(run).values(), cfg, m.R)
    s = np.load(run / "data" / "val_slices.npz")["images"]
    x = torch.from_numpy(s[[30, 60, 90, 120]].astype(np.float32))[:, None]
    feeds, want = ex.reference_io(modules, x, m.R, m.lam)
    assert 0 < feeds["mvtm_step"]["mask"].mean() < 1
    tol = ex.TOLERANCES[precision]
    for name in GRAPHS:
        key = name if precision == "fp32" else f"{name}.fp16"
        checks = ex.check_graph(name, out / m.graphs[key]["file"], feeds[name], want[name], tol, m.lam)
        assert all(c.passed for c in checks), [str(c) for c in checks]
        if precision == "fp32":   # the same arithmetic: far inside the tolerance
            assert all(c.mismatch_share == 0 and c.max_abs_err < 1e-5 for c in checks), [str(c) for c in checks]


class OrtEngine:
    """The smallest engine over the exported graphs: numpy arrays in, one onnxruntime session per graph."""

    def __init__(self, out, m: Manifest, suffix: str = ""):
        self.name, self.R = "ort", m.R
        self.s = {g: ort.InferenceSession(str(out / m.graphs[g + suffix]["file"]),
                                          providers=["CPUExecutionProvider"]) for g in GRAPHS}

    def put(self, a):
        return a

    def get(self, a):
        return a

    def repeat(self, tokens):
        return np.repeat(tokens, self.R, axis=0)

    def encode(self, x):
        return self.s["encode"].run(None, {"x": x})[0]

    def detect(self, tokens):
        return self.s["atd"].run(None, {"tokens": tokens})[0]

    def mvtm_step(self, tokens, mask, noise):
        return self.s["mvtm_step"].run(None, {"tokens": tokens, "mask": mask, "noise": noise})[0]

    def decode_score(self, tokens, x):
        return self.s["decode_score"].run(None, {"tokens": tokens, "x": x})[0]


def test_restoration_loop_on_graphs_matches_torch_engine(exported):
    run, out, m = exported
    cfg = preset("tiny").restore
    models = _models(run)
    s = np.load(run / "data" / "val_slices.npz")["images"]
    x = s[[40, 70, 100, 130]].astype(np.float32)[:, None]                      # [B, 1, H, W]
    want = restore(TorchEngine(*models.values(), cfg), x, cfg, np.random.default_rng(5), lam=m.lam,
                   keep_tokens=True)
    got = restore(OrtEngine(out, m), x, cfg, np.random.default_rng(5), lam=m.lam, keep_tokens=True)
    assert 0 < want.masked[0] < B * m.R * 400 and len(want.masked) == cfg.T
    assert got.masked == want.masked
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.token_scores, want.token_scores, atol=1e-6)
    np.testing.assert_allclose(got.maps, want.maps, atol=1e-6)
    assert want.maps.max() > 0.05                                              # a real map, not zeros

    half = restore(OrtEngine(out, m, ".fp16"), x, cfg, np.random.default_rng(5), lam=m.lam, keep_tokens=True)
    assert (half.tokens == want.tokens).mean() > 0.95
    assert np.abs(half.maps - want.maps).mean() < 1e-2


def test_failed_check_writes_nothing(exported, monkeypatch):
    run, out, m = exported
    before = {p.name: file_sha256(p) for p in out.iterdir() if p.is_file()}
    strict = ex.Tolerances(**{**ex.TOLERANCES["fp32"].__dict__, "token_mismatch": -1.0})  # cannot pass
    monkeypatch.setitem(ex.TOLERANCES, "fp32", strict)
    with pytest.raises(ex.ValidationError, match="encode.onnx does not match PyTorch"):
        ex.export_run(run, batch=B, progress=False)
    assert {p.name: file_sha256(p) for p in out.iterdir() if p.is_file()} == before
    assert not list(out.parent.glob(".export.*"))


def test_bad_run_folders(exported, tmp_path):
    run, _, _ = exported
    with pytest.raises(InputError, match="run folder not found"):
        ex.export_run(tmp_path / "nope", progress=False)

    bad = tmp_path / "bad"
    shutil.copytree(run, bad, ignore=shutil.ignore_patterns("export"))
    (bad / "atd" / "best.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a mimood checkpoint") as e:
        ex.export_run(bad, progress=False)
    assert str(e.value).startswith(str(bad / "atd" / "best.safetensors"))

    shutil.copyfile(run / "atd" / "best.safetensors", bad / "atd" / "best.safetensors")
    (bad / "data" / "val_slices.npz").unlink()
    with pytest.raises(InputError, match="slice cache not found"):
        ex.export_run(bad, progress=False)

    (bad / "calibration.json").write_text('{"lam": 0.1}')
    with pytest.raises(InputError, match="calibration"):
        ex.export_run(bad, progress=False)

    (bad / "config.json").write_text("{broken")
    with pytest.raises(InputError, match="config.json"):
        ex.export_run(bad, progress=False)

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not an export folder"):
        ex.export_run(run, out=tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
