"""ATD token AP/AUROC on real lesion tokens for several ATDs sharing one VQ-VAE, e.g. trained with the paper's
uniform replacement codes, with `masks.corruption = "prior"` (codes drawn from the healthy brain code
frequencies) and with `masks.lesion_share > 0` (image-space synthetic lesions, mimood.models.lesions).

    python benchmarks/atd_corruption.py --vqvae RUN/vqvae/best.safetensors \\
        --atd uniform=RUN/atd/best.safetensors --atd lesion=RUN2/atd/best.safetensors --data TEST_DIR [--stride 4]

Brain tokens only (a token is brain if any pixel is; lesion if any pixel has label > 0), every `stride`-th slice.
Results: benchmarks/results/atd_corruption.md.
"""
import argparse

import numpy as np
import torch

from mimood.config import RunConfig
from mimood.data.discover import discover
from mimood.data.preprocess import preprocess
from mimood.eval.metrics import token_labels, token_metrics
from mimood.models.checkpoint import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vqvae", required=True)
    ap.add_argument("--atd", action="append", required=True, help="name=checkpoint")
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", help="run config.json for preprocessing (default: beside the VQ-VAE)")
    ap.add_argument("--stride", type=int, default=4)
    args = ap.parse_args()
    cfg = RunConfig.load(args.config or str(__import__("pathlib").Path(args.vqvae).parents[1] / "config.json"))
    vq = load_model(args.vqvae)[0].eval()
    atds = {n: load_model(p)[0].eval() for n, p in (a.split("=", 1) for a in args.atd)}
    scores, labels, brains = {n: [] for n in atds}, [], []
    for case in [c for c in discover(args.data) if c.label is not None]:
        s = preprocess(case.image, cfg.data, label=case.label)
        rows = np.arange(0, len(s.images), args.stride)
        x = torch.from_numpy(s.images[rows].astype(np.float32))[:, None]   # [S, 1, 160, 160]
        with torch.no_grad():
            tok = vq.encode(x).flatten(1)                                    # [S, 400]
            for n, m in atds.items():
                scores[n].append(torch.sigmoid(m(tok).float()).numpy())
        labels.append(token_labels(s.labels[rows] > 0).reshape(len(rows), -1))
        brains.append(token_labels(s.images[rows] > 0).reshape(len(rows), -1))
    y, b = np.concatenate(labels), np.concatenate(brains)
    for n in atds:
        m = token_metrics(np.concatenate(scores[n]), y, b)
        print(f"{n}: token AP {m['ap']:.3f}, AUROC {m['auroc']:.3f} ({int(y[b].sum())} lesion of {int(b.sum())} "
              f"brain tokens)")


if __name__ == "__main__":
    main()
