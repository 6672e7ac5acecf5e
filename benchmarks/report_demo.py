"""Issue 16's outputs on real scans with a real model: `mimood-infer`'s overlays, lesion statistics, [0, 1] scores,
index.html with its viewer, the MOOD folder, and headless-browser screenshots of the page.

    python benchmarks/report_demo.py -m EXPORT [--data ../shared/data/real] [--out /tmp/report_demo]
                                     [--mood] [--screenshot benchmarks/results/report_index.png]

Links the six BraTS T2 volumes, the healthy volunteer T2 and the chronic-stroke T2 of --data into OUT_in (links
only: the scans stay in shared/), adds a cut-off copy of the volunteer (a failed row), and runs
`mimood.runtime.infer_folder` into OUT (with --continue, so a second call only redoes what is missing); --mood also
writes OUT_mood in the MOOD convention (inference again) and checks it. With --screenshot FILE: FILE (the page)
and FILE_viewer.png (the viewer opened on the scan with the highest score) from headless Chromium.
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from mimood.runtime.infer import infer_folder

SCANS = ["lesion/*_t2.nii.gz", "healthy/niivue_volunteer_t2w.nii.gz", "lesion/stroke_nomask/cstar_stroke_t2.nii.gz"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True, type=Path, help="export folder")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "report_demo")
    ap.add_argument("--mood", action="store_true")
    ap.add_argument("--screenshot", default="")
    args = ap.parse_args()
    inp = args.out.parent / f"{args.out.name}_in"
    inp.mkdir(parents=True, exist_ok=True)
    for pattern in SCANS:
        for scan in sorted(args.data.glob(pattern)):
            link = inp / scan.name
            if not link.is_symlink():
                link.symlink_to(scan.resolve())
    (inp / "broken_download.nii.gz").write_bytes((args.data / SCANS[1]).read_bytes()[:4000])

    report = infer_folder(inp, args.out, args.model, backend="ort", resume=True)
    for r in report.rows:
        s = r.stats
        print(f"{r.name:32s} {r.status:6s} scan {r.scan_score}  raw {r.raw_score}  "
              + (f"{s.components} components, {s.flagged_ml:.1f} ml, largest {s.largest_ml} ml" if s else r.error))
    print(report.path.parent / "index.html")
    if args.mood:
        mood = infer_folder(inp, args.out.parent / f"{args.out.name}_mood", args.model, backend="ort", fmt="mood",
                            resume=True)
        print("MOOD folder:", "follows the convention" if not mood.problems else "; ".join(mood.problems))
    if args.screenshot:
        page = args.out / "index.html"
        top = max((r for r in report.rows if r.scan_score is not None), key=lambda r: r.scan_score)
        shot(page, Path(args.screenshot))
        shot(page, Path(args.screenshot).with_name(Path(args.screenshot).stem + "_viewer.png"), view=top.name)


def shot(page: Path, png: Path, view: str = "") -> None:
    """A screenshot of the page in headless Chromium (software WebGL), with the viewer open on `view`."""
    url = page.resolve().as_uri() + (f"#view={view}" if view else "")
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                    "--window-size=1400,1000", "--virtual-time-budget=20000", f"--screenshot={png}", url],
                   check=True, capture_output=True, timeout=300)
    print(png)


if __name__ == "__main__":
    main()
