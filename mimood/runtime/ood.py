"""The scan-level OOD score at inference, from an export folder alone (no torch, no run folder).

The exporter (mimood.export.export) writes, when the run has fitted OOD statistics:
    ood_features.onnx     the run's FeatureGraph (tokens [B, N] int32 -> h [B, N, d] float32, the fitted pass
                          type, static batch B = the loop graphs' batch), validated against PyTorch
    ood.safetensors       the fitted statistics (mimood.train.ood_fit)
and records them in manifest.extra.ood (files, hashes, graph I/O, the chosen score, its aggregation, the
healthy reference) and the chosen score's name in manifest.scan_score.

Features run in onnxruntime whatever backend restores the slices (TensorRT, torch, onnxruntime), so the OOD
score of a scan is the same number on every backend. Tokens come from the restoring engine's own encoder, and so
do the tokens of the left-right mirrored slices that the `mirror` score needs (one more encode per batch).

    ood = OODRuntime.open(folder, manifest.extra.ood)
    parts = ood.parts(tokens, images, mirror_tokens)   # per batch: [n, N] int32 tokens, [n, H, W] slices
    report = ood.score(SliceParts.cat(...))     # per scan: {"score", "value", "z", "percentile", ...}
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mimood.contract import OODRecord
from mimood.errors import InputError
from mimood.ood.scan import OODScorer, SliceParts, brain_share
from mimood.runtime.threads import session_options

CPU = "CPUExecutionProvider"


class OODRuntime:
    """An onnxruntime session of the feature graph and the fitted scorer of one export folder."""

    def __init__(self, session, scorer: OODScorer, batch: int, provider: str):
        self.session, self.scorer, self.batch, self.provider = session, scorer, batch, provider

    @classmethod
    def open(cls, folder: str | Path, info: OODRecord, providers: list[str] | None = None) -> "OODRuntime":
        """Load the graph and statistics named by `info` (= manifest.extra.ood; their hashes are checked by
        Manifest.verify when the bundle is opened)."""
        import onnxruntime as ort

        folder = Path(folder)
        graph, stats = folder / info.graph.file, folder / info.stats.file
        try:
            session = ort.InferenceSession(str(graph), session_options(ort), providers=providers or [CPU])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
            raise InputError(graph, f"onnxruntime cannot load the OOD feature graph: {e}") from None
        scorer = OODScorer.load(stats)
        batch = int(info.graph.inputs["tokens"][0][0])
        return cls(session, scorer, batch, session.get_providers()[0])

    @property
    def score_name(self) -> str:
        return self.scorer.scan_score_name

    def features(self, tokens: np.ndarray) -> np.ndarray:
        """h [S, N, d] float32 of tokens [S, N], in the graph's fixed batches (the last one zero-padded)."""
        tokens = np.asarray(tokens, dtype=np.int32)
        out = []
        for i in range(0, len(tokens), self.batch):
            chunk = tokens[i:i + self.batch]
            feed = np.zeros((self.batch, tokens.shape[1]), np.int32)                  # [B, N]
            feed[:len(chunk)] = chunk
            out.append(self.session.run(None, {"tokens": feed})[0][:len(chunk)])
        return np.concatenate(out)

    def parts(self, tokens: np.ndarray, images: np.ndarray, mirror_tokens: np.ndarray | None = None) -> SliceParts:
        """Per-slice parts of the score for slices images [S, H, W] (background 0) with tokens [S, N], and the
        tokens [S, N] of the mirrored slices (mimood.ood.mirror.mirror_slices) for `mirror`."""
        h_mirror = None if mirror_tokens is None else self.features(mirror_tokens)
        return self.scorer.parts(self.features(tokens), tokens, brain_share(np.asarray(images) > 0),
                                 h_mirror=h_mirror)

    def score(self, parts: SliceParts) -> dict:
        """The chosen scan score of ONE scan's parts (in slice order), with its place among the healthy
        reference scans of the fit (OODScorer.report)."""
        return self.scorer.report(self.scorer.combine(parts))
