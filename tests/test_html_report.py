"""OUT/index.html: parses, lists every scan (failed ones with their error), sorts by score, and its NiiVue viewer
opens scan + map from file:// in a real headless Chromium (skipped without one)."""
import shutil
import subprocess
from html.parser import HTMLParser

import nibabel as nib
import numpy as np
import pytest

from mimood.runtime.html_report import NIIVUE_FILES, Entry, write_index, write_viewer_data

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
AFFINE = np.array([[-1.0, 0, 0, 20], [0, 1.0, 0, -24], [0, 0, 2.0, -15], [0, 0, 0, 1]])


class Page(HTMLParser):
    """Rows (data-name), image sources, script sources and the text of the page."""

    def __init__(self):
        super().__init__()
        self.rows, self.images, self.scripts, self.buttons, self.text, self.stack = [], [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in ("br", "img", "meta"):
            self.stack.append(tag)
        if tag == "tr" and "data-name" in a:
            self.rows.append(a["data-name"])
        if tag == "img":
            self.images.append(a["src"])
        if tag == "script" and "src" in a:
            self.scripts.append(a["src"])
        if tag == "button" and "data-src" in a:
            self.buttons.append(a)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

    def handle_data(self, data):
        self.text.append(data)


def volumes(folder, name, seed):
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (40, 48, 30)], indexing="ij")
    brain = x ** 2 + y ** 2 + z ** 2 <= 0.8
    scan = np.where(brain, rng.uniform(50, 150, brain.shape), 0).astype(np.float32)
    amap = np.where(brain & (x > 0.3), 0.2, 0.01 * brain).astype(np.float32)
    nib.save(nib.Nifti1Image(scan, AFFINE), str(folder / f"{name}_scan.nii.gz"))
    img = nib.Nifti1Image(amap, AFFINE)
    img.header["cal_min"], img.header["cal_max"] = 0.08, 0.16
    nib.save(img, str(folder / f"{name}.nii.gz"))
    return folder / f"{name}_scan.nii.gz", folder / f"{name}.nii.gz"


@pytest.fixture()
def report(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    entries = []
    for k, (name, score) in enumerate([("low", 0.12), ("high", 0.97), ("mid <&>", 0.5)]):
        scan, amap = volumes(out, name, k)
        viewer, why = write_viewer_data(out, name, scan, amap)
        assert why == "" and viewer == f"viewer/{name}.js"
        (out / f"{name}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        row = {"file": str(scan), "status": "ok", "error": "", "scan_score": score, "raw_score": 8 + score,
               "components": k, "largest_ml": 1.5 * k, "flagged_ml": 2.0 * k, "largest_slice_first": 3,
               "largest_slice_last": 9, "slice_axis": 2, "largest_r_mm": 10.0, "largest_a_mm": -5.0,
               "largest_s_mm": 2.0, "seconds": 1.0}
        entries.append(Entry(name, row, overlay=f"{name}.png", viewer=viewer, focus_mm=(10.0, -5.0, 2.0)))
    entries.append(Entry("broken", {"file": "in/broken.nii.gz", "status": "failed",
                                    "error": "in/broken.nii.gz: truncated gzip data"}))
    return out, write_index(out, entries, notes=["model: test"])


def test_page_parses_and_references_every_scan(report):
    out, page = report
    assert page == out / "index.html"
    p = Page()
    p.feed(page.read_text())
    p.close()
    assert p.stack == []                                                      # every element closed
    assert p.rows == ["low", "high", "mid <&>", "broken"]
    assert sorted(p.images) == ["high.png", "low.png", "mid <&>.png"] and all((out / i).is_file() for i in p.images)
    assert p.scripts == ["viewer/niivue.umd.js"]
    assert all((out / "viewer" / f).is_file() for f in NIIVUE_FILES)          # NiiVue with its licence
    assert "BSD 2-Clause" in (out / "viewer" / "LICENSE").read_text()
    assert [b["data-src"] for b in p.buttons] == ["viewer/low.js", "viewer/high.js", "viewer/mid <&>.js"]
    assert all((out / b["data-src"]).is_file() for b in p.buttons)
    text = " ".join(p.text)
    assert "Failed scans" in text and "in/broken.nii.gz: truncated gzip data" in text
    assert "k 3-9" in text and "10, -5, 2" in text and "0.970" in text
    assert "https://" not in page.read_text() and "http://" not in page.read_text()   # nothing from a network


def test_viewer_data_refused_when_too_large(tmp_path):
    scan, amap = volumes(tmp_path, "a", 0)
    rel, why = write_viewer_data(tmp_path / "out", "a", scan, amap, max_mb=0.001)
    assert rel is None and "over 0.001 MB" in why
    rel, why = write_viewer_data(tmp_path / "out", "a", tmp_path / "missing.nii.gz", amap)
    assert rel is None and why.startswith("no viewer:")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")
def test_in_headless_chromium_sorted_by_score_and_viewer_ready(report):
    out, page = report
    url = page.resolve().as_uri() + "#view=high"
    run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--use-angle=swiftshader",
                          "--enable-unsafe-swiftshader", "--virtual-time-budget=15000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=240)
    dom = run.stdout
    assert "<table" in dom, run.stderr[-2000:]
    assert 'data-viewer="ready 2"' in dom, dom[dom.find("<body"):dom.find("<body") + 300]   # scan + map loaded
    p = Page()
    p.feed(dom[dom.find("<table"):dom.find("</table>") + 8])
    assert p.rows == ["high", "mid <&>", "low", "broken"]                    # by score, highest first
