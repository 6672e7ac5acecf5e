"""Issue 16's outputs on real scans, before they are wired into `mimood-infer`: overlays, lesion statistics, the
[0, 1] score, the HTML report with its viewer, and a headless-browser screenshot of it.

    python benchmarks/report_demo.py [--data ../shared/data/real] [--out /tmp/report_demo] [--screenshot FILE]

Writes OUT (maps, masks after the component filter, overlays, viewer data, index.html), OUT_mood (the same maps
in the MOOD convention, checked by mimood.runtime.mood.check_mood_folder) and, with --screenshot FILE, FILE (the
page) and FILE_viewer.png (the viewer opened on the first case) from headless Chromium.

The maps are STAND-INS, not model output: each BraTS case's expert segmentation (seg > 0) smoothed in-plane and
scaled to 0.2, plus uniform noise up to 0.03 everywhere in the brain and speckle up to 0.18 on the edge slices (the
noisy first and last slices a real map has); the healthy volunteer scan gets the noise only. They exercise
everything that reads a map: the component filter (the speckle must go), the panel choice (the lesion, not the
edges), slice numbers on the input grid, the report and the viewer. The raw scan score is the map score
(mimood.runtime.outputs.scan_score) and the healthy reference is made of the noise-only maps of 24 volunteer
copies with other noise seeds: a stand-in as well, labelled so on the page.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from mimood.config import DataConfig
from mimood.data.io import save_nifti
from mimood.data.preprocess import preprocess, to_volume
from mimood.errors import InputError
from mimood.runtime.components import lesion_stats
from mimood.runtime.html_report import Entry, write_index, write_viewer_data
from mimood.runtime.mood import check_mood_folder, write_mood_scan
from mimood.runtime.outputs import map_header, output_paths, scan_score
from mimood.runtime.overlay import write_overlay
from mimood.runtime.reference import HealthyReference

THRESHOLD = 0.08
CASES = ["lesion/brats18_tcia01_425_1", "lesion/brats18_cbica_ame_1", "lesion/brats18_tcia10_628_1"]
HEALTHY = "healthy/niivue_volunteer_t2w.nii.gz"


def stand_in(slices, seed: int) -> np.ndarray:
    """maps [S, H, W]: the smoothed label (if any) + noise + edge-slice speckle (module docstring)."""
    rng = np.random.default_rng(seed)
    lab = slices.labels.astype(np.float32) if slices.labels is not None else np.zeros_like(slices.images)
    maps = ndimage.gaussian_filter(lab, (1, 3, 3)) * 0.2 + rng.uniform(0, 0.03, lab.shape)
    area = slices.brain.sum(axis=(1, 2))
    edge = area < 0.25 * area.max()
    maps[edge] += (rng.uniform(size=maps[edge].shape) > 0.9) * 0.15
    return np.where(slices.brain, maps, 0).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "report_demo"))
    ap.add_argument("--screenshot", default="")
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = DataConfig()

    healthy = preprocess(data / HEALTHY, cfg)
    ref = HealthyReference([scan_score(stand_in(healthy, 100 + i), healthy.brain) for i in range(24)],
                           name="map (stand-in)")
    jobs = [(data / f"{c}_t2.nii.gz", data / f"{c}_seg.nii.gz") for c in CASES] + [(data / HEALTHY, None)]
    bad = out.parent / f"{out.name}_broken.nii.gz"                      # a cut-off download, outside OUT
    bad.write_bytes((data / HEALTHY).read_bytes()[:5000])
    jobs.append((bad, None))

    mood = out.parent / f"{out.name}_mood"                              # the --format mood folder of the same maps
    if mood.exists():
        shutil.rmtree(mood)
    entries, done = [], []
    for k, (image, label) in enumerate(jobs):
        name = image.name[: -len(".nii.gz")]
        try:
            slices = preprocess(image, cfg, label=label)
        except InputError as e:
            entries.append(Entry(name, {"file": str(image), "status": "failed", "error": str(e)}))
            print(f"failed: {e}")
            continue
        maps = stand_in(slices, k)
        raw = scan_score(maps, slices.brain)
        paths = output_paths(out, name, image)
        vol = to_volume(maps, slices.geometry)
        save_nifti(np.asarray(vol.dataobj), vol.affine, map_header(vol, THRESHOLD, ref.name), paths["map"])
        kept, stats = lesion_stats(np.asarray(vol.dataobj) > THRESHOLD, vol.affine)
        save_nifti(kept.astype(np.uint8), vol.affine, map_header(vol, THRESHOLD, mask=True), paths["mask"],
                   dtype=np.uint8)
        rep = ref.report(raw)
        write_mood_scan(mood, image, vol, rep["score"])
        done.append(image)
        note = write_overlay(paths["png"], name, slices, maps, THRESHOLD, rep["score"],
                             f"{ref.name} vs {ref.n} healthy")
        viewer, why = write_viewer_data(out, name, image, paths["map"])
        focus = None if stats.largest_ml is None else (stats.largest_r_mm, stats.largest_a_mm, stats.largest_s_mm)
        row = {"file": str(image), "status": "ok", "error": "", "scan_score": rep["score"],
               "raw_score": round(raw, 5), **stats.row(), "seconds": 0.0}
        entries.append(Entry(name, row, overlay=paths["png"].name if not note else None, viewer=viewer,
                             note=note or why, focus_mm=focus))
        print(name, row)
    page = write_index(out, entries, notes=[
        "STAND-IN maps (issue 16 demo): expert segmentation smoothed + noise, not model output",
        f"threshold {THRESHOLD}; healthy reference: {ref.n} noise-only stand-in maps"])
    print(page)
    problems = check_mood_folder(mood, done)
    print(f"MOOD folder {mood}: {len(list(mood.iterdir()))} files, "
          + ("follows the convention" if not problems else "; ".join(problems)))
    if args.screenshot:
        shot(page, Path(args.screenshot))
        shot(page, Path(args.screenshot).with_name(Path(args.screenshot).stem + "_viewer.png"), view=entries[0].name)


def shot(page: Path, png: Path, view: str = "") -> None:
    """A screenshot of the page in headless Chromium (software WebGL), with the viewer open on `view`."""
    url = page.resolve().as_uri() + (f"#view={view}" if view else "")
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                    "--window-size=1400,1000", "--virtual-time-budget=20000", f"--screenshot={png}", url],
                   check=True, capture_output=True, timeout=300)
    print(png)


if __name__ == "__main__":
    main()
