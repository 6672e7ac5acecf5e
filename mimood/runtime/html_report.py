"""OUT/index.html: every scan of an inference run on one page that opens from the file, offline.

    entries = [Entry(name, row, overlay="case.png", viewer=write_viewer_data(out, name, scan, map_path)), ...]
    write_index(out, entries, notes=["model: ..."])

One row per scan: status, scan score, the report.csv statistics, the overlay PNG; sortable by clicking a column
head (by the scan score, highest first, when it opens); failed scans are listed first, with their error, and also
stay in the table. Everything (styles, sorting) is inside the page: it works from file:// without a network.

Interactive viewer: NiiVue (github.com/niivue/niivue, BSD-2-Clause; its minified UMD build and licence are bundled
in mimood/runtime/assets/niivue/ and copied to OUT/viewer/), scan + map in three planes, radiological convention,
the map over [cal_min, cal_max] of its header (from the threshold up: mimood.runtime.outputs.map_header), the
crosshair on the largest component's centre. Browsers refuse `fetch` of local files from a page opened as file://,
so NiiVue cannot load OUT/<name>.nii.gz itself; `write_viewer_data` therefore writes OUT/viewer/<name>.js, a script
(which a page may load from file://) holding 8-bit copies of the scan and the map as gzipped NIfTI in base64:
the input's grid, affine and the map's header, values quantised to 256 levels with the NIfTI scale slope so the
viewer reads them in the original units (a float map full of noise compresses badly: the exact files would make
~10 MB per BraTS scan, the copies ~2-3 MB). The exact maps are the .nii.gz files beside index.html.
"""
from __future__ import annotations

import base64
import gzip
import html
import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import nibabel as nib
import numpy as np

from mimood import __version__
from mimood.data.io import atomic_write
from mimood.runtime.reference import format_score

ASSETS = Path(__file__).with_name("assets") / "niivue"
NIIVUE_FILES = ("niivue.umd.js", "LICENSE", "README.md")
VIEWER_MAX_MB = 32.0           # scans whose viewer data would be larger get no interactive viewer

# (column, head, unit): shown when some row has it; the scan score first and the default sort
COLUMNS = [("scan_score", "scan score", ""), ("raw_score", "raw score", ""), ("map_score", "map score", ""),
           ("components", "components", ""), ("largest_ml", "largest", "ml"), ("flagged_ml", "flagged", "ml"),
           ("largest_slices", "largest: slices", ""),
           ("largest_centroid", "largest: centre R, A, S", "mm"), ("seconds", "time", "s")]


@dataclass
class Entry:
    name: str                     # the scan's output name (<name>.nii.gz, <name>.png)
    row: dict                     # its report.csv row: column -> value ("" or None when empty)
    overlay: str | None = None    # the PNG, relative to OUT
    viewer: str | None = None     # its viewer data script, relative to OUT (write_viewer_data)
    note: str = ""                # e.g. why there is no viewer
    focus_mm: tuple[float, float, float] | None = None   # where the viewer's crosshair starts (world mm, RAS+)


def write_viewer_data(out: str | Path, name: str, scan: str | Path | nib.Nifti1Image,
                      map_volume: str | Path | nib.Nifti1Image, max_mb: float = VIEWER_MAX_MB
                      ) -> tuple[str | None, str]:
    """OUT/viewer/<name>.js with 8-bit copies of the scan and the map (module docstring), atomically:
    (its path relative to OUT, "") or (None, why not)."""
    try:
        scan_img = scan if isinstance(scan, nib.Nifti1Image) else nib.load(scan)
        map_img = map_volume if isinstance(map_volume, nib.Nifti1Image) else nib.load(map_volume)
        blobs = [_eight_bit(scan_img, np.percentile), _eight_bit(map_img, None)]
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as e:
        return None, f"no viewer: {e}"
    size = sum(len(b) for b in blobs) * 4 / 3
    if size > max_mb * 1e6:
        return None, f"no viewer: its data would be {size / 1e6:.0f} MB (over {max_mb:g} MB)"
    data = {"scan": base64.b64encode(blobs[0]).decode("ascii"), "scanName": "scan.nii.gz",
            "map": base64.b64encode(blobs[1]).decode("ascii"), "mapName": "map.nii.gz"}
    rel = f"viewer/{name}.js"
    with atomic_write(Path(out) / rel) as tmp:
        tmp.write_text("window.mimoodVolumes = window.mimoodVolumes || {};\n"
                       f"window.mimoodVolumes[{_js(name)}] = {json.dumps(data)};\n")
    return rel, ""


def _eight_bit(img: nib.Nifti1Image, percentile) -> bytes:
    """Gzipped NIfTI-1 bytes of img quantised to uint8 over [min(0, lowest), top] with scl_slope/inter, top = the
    99.5th percentile of the non-zero voxels (a scan: brighter voxels saturate, as in any display) or the maximum
    (a map: every value stays readable to 1/255 of it)."""
    data = np.asarray(img.dataobj, dtype=np.float32)                      # [X, Y, Z]
    nz = data[data != 0]
    low = min(0.0, float(data.min()))
    top = float(percentile(nz, 99.5)) if percentile is not None and nz.size else float(data.max())
    slope = (top - low) / 255.0 if top > low else 1.0
    q = np.clip(np.round((data - low) / slope), 0, 255).astype(np.uint8)
    header = img.header.copy() if isinstance(img.header, nib.Nifti1Header) else None
    out = nib.Nifti1Image(q, img.affine, header)
    out.header.set_data_dtype(np.uint8)
    out.header.set_slope_inter(slope, low)
    return gzip.compress(out.to_bytes(), compresslevel=6)


def _js(obj) -> str:
    """JSON that is safe inside a <script> element."""
    return json.dumps(obj).replace("</", "<\\/")


def _value(row: dict, key: str):
    """(sort key, cell text) of a column; composite columns are built from their parts."""
    if key == "largest_slices":
        a, b, axis = row.get("largest_slice_first"), row.get("largest_slice_last"), row.get("slice_axis")
        if a in (None, "") or b in (None, ""):
            return None, ""
        name = "ijk"[int(axis)] if axis not in (None, "") else ""
        return float(a), f"{name} {int(float(a))}-{int(float(b))}".strip()
    if key == "largest_centroid":
        parts = [row.get(f"largest_{c}_mm") for c in "ras"]
        if any(p in (None, "") for p in parts):
            return None, ""
        return float(parts[0]), ", ".join(f"{float(p):.0f}" for p in parts)
    v = row.get(key)
    if v in (None, ""):
        return None, ""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None, str(v)
    if key == "scan_score":
        return f, format_score(f)
    if key.endswith("score"):
        return f, f"{f:.4g}"
    return f, f"{f:.1f}" if isinstance(v, float) or "." in str(v) else str(v)


def _has(entries: list[Entry], key: str) -> bool:
    probe = {"largest_slices": "largest_slice_first", "largest_centroid": "largest_r_mm"}.get(key, key)
    return any(e.row.get(probe) not in (None, "") for e in entries)


def copy_viewer(out: str | Path) -> None:
    """NiiVue's build and licence into OUT/viewer/ (skipped when the same files are there)."""
    target = Path(out) / "viewer"
    target.mkdir(parents=True, exist_ok=True)
    for name in NIIVUE_FILES:
        src, dst = ASSETS / name, target / name
        if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
            with atomic_write(dst) as tmp:
                shutil.copyfile(src, tmp)


def write_index(out: str | Path, entries: list[Entry], title: str = "mimood anomaly maps",
                notes: list[str] = (), columns: list[tuple[str, str, str]] = COLUMNS) -> Path:
    """Write OUT/index.html (module docstring), atomically; returns its path."""
    out = Path(out)
    cols = [c for c in columns if _has(entries, c[0])]
    viewer = any(e.viewer for e in entries)
    if viewer:
        copy_viewer(out)
    esc = html.escape
    head = "".join(f'<th data-col="{i + 3}" data-num="1">{esc(h)}{f" ({esc(u)})" if u else ""}</th>'
                   for i, (_, h, u) in enumerate(cols))
    body = []
    failed = [e for e in entries if str(e.row.get("status", "")) != "ok"]
    for e in entries:
        status = str(e.row.get("status", ""))
        ok = status == "ok"
        cells = [f'<td class="name">{esc(e.name)}<br><span class="file">{esc(str(e.row.get("file", "")))}</span></td>',
                 f'<td class="{"ok" if ok else "failed"}">{esc(status)}'
                 + ("" if ok else f'<br><span class="error">{esc(str(e.row.get("error", "")))}</span>') + "</td>"]
        pic = (f'<a href="{esc(e.overlay)}"><img src="{esc(e.overlay)}" alt="overlay of {esc(e.name)}" '
               f'loading="lazy"></a>') if e.overlay else ""
        focus = "" if e.focus_mm is None else esc(",".join(f"{float(v):.2f}" for v in e.focus_mm))
        view = (f'<button class="view" data-name="{esc(e.name)}" data-src="{esc(e.viewer)}" '
                f'data-focus="{focus}">3-D viewer</button>' if e.viewer else "")
        note = f'<span class="note">{esc(e.note)}</span>' if e.note else ""
        cells.append(f'<td class="pic">{pic}{view}{note}</td>')
        for key, _, _ in cols:
            k, text = _value(e.row, key)
            cells.append(f'<td data-sort="{"" if k is None else k}">{esc(text)}</td>')
        body.append(f'<tr data-name="{esc(e.name)}">' + "".join(cells) + "</tr>")
    failures = ("<section class=\"failures\"><h2>Failed scans</h2><ul>"
                + "".join(f"<li><b>{esc(e.name)}</b>: {esc(str(e.row.get('error', '')))}</li>" for e in failed)
                + "</ul></section>") if failed else ""
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    notes_html = "".join(f"<li>{esc(n)}</li>" for n in notes)
    score_col = next((i + 3 for i, c in enumerate(cols) if c[0] == "scan_score"), -1)
    page = _PAGE.format(
        title=esc(title), version=esc(__version__), stamp=stamp, n=len(entries), n_failed=len(failed),
        notes=f"<ul class=\"notes\">{notes_html}</ul>" if notes else "", failures=failures, head=head,
        body="\n".join(body), score_col=score_col,
        niivue='<script src="viewer/niivue.umd.js"></script>' if viewer else "",
        viewer_html=_VIEWER_HTML if viewer else "", viewer_js=_VIEWER_JS if viewer else "")
    path = out / "index.html"
    with atomic_write(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.2em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right; vertical-align: top; }}
th {{ cursor: pointer; background: #f3f3f3; position: sticky; top: 0; white-space: nowrap; }}
th.sorted-desc::after {{ content: " \\25BC"; }} th.sorted-asc::after {{ content: " \\25B2"; }}
td.name, td.ok, td.failed, td.pic, th.left {{ text-align: left; }}
td.failed, .error {{ color: #b00; }} .file, .note {{ color: #777; font-size: 80%; }}
img {{ width: 480px; display: block; }}
button.view {{ margin-top: 3px; }}
.failures {{ border: 1px solid #b00; padding: 0 1em; margin-bottom: 1em; }}
#viewer {{ display: none; position: fixed; inset: 3% 3%; background: #111; border: 2px solid #444; z-index: 10; }}
#viewer canvas {{ width: 100%; height: calc(100% - 2.2em); }}
#viewer .bar {{ color: #eee; padding: 0.3em 0.6em; height: 1.6em; }}
#viewer button {{ float: right; }}
</style>{niivue}</head>
<body data-viewer="none">
<h1>{title}</h1>
<p>{n} scans, {n_failed} failed. mimood {version}, written {stamp}. Click a column head to sort.</p>
{notes}{failures}
<table id="scans"><thead><tr><th data-col="0" class="left">scan</th><th data-col="1" class="left">status</th>
<th class="left">overlay (radiological: patient's right on the left)</th>{head}</tr></thead>
<tbody>
{body}
</tbody></table>
{viewer_html}
<script>
(function () {{
  const table = document.getElementById("scans");
  const heads = table.tHead.rows[0].cells;
  function sortBy(col, desc) {{
    const rows = Array.from(table.tBodies[0].rows);
    const num = heads[col].dataset.num === "1";
    rows.sort(function (a, b) {{
      const x = num ? a.cells[col].dataset.sort : a.cells[col].textContent;
      const y = num ? b.cells[col].dataset.sort : b.cells[col].textContent;
      if (x === "" && y !== "") return 1;              // empty cells last, whichever the direction
      if (y === "" && x !== "") return -1;
      const c = num ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
      return desc ? -c : c;
    }});
    rows.forEach(function (r) {{ table.tBodies[0].appendChild(r); }});
    Array.from(heads).forEach(function (h) {{ h.classList.remove("sorted-asc", "sorted-desc"); }});
    heads[col].classList.add(desc ? "sorted-desc" : "sorted-asc");
  }}
  Array.from(heads).forEach(function (h, i) {{
    if (h.dataset.col === undefined) return;
    h.addEventListener("click", function () {{ sortBy(i, !h.classList.contains("sorted-desc")); }});
  }});
  if ({score_col} >= 0) sortBy({score_col}, true);
}})();
{viewer_js}
</script>
</body></html>
"""

_VIEWER_HTML = """<div id="viewer"><div class="bar"><span id="viewer-title"></span>
<button id="viewer-close">close</button></div><canvas id="gl"></canvas></div>"""

# Opens on a "3-D viewer" button, or at load for index.html#view=<name>. Volumes come from viewer/<name>.js
# (a script: file:// pages may load scripts, not fetch files); body[data-viewer] says "ready" or "error: ...".
_VIEWER_JS = r"""
(function () {
  let nv = null;
  function load(src) {
    return new Promise(function (resolve, reject) {
      const s = document.createElement("script");
      s.src = src; s.onload = resolve; s.onerror = function () { reject(new Error("cannot load " + src)); };
      document.head.appendChild(s);
    });
  }
  async function open(name, src, focus) {
    document.body.dataset.viewer = "loading";
    document.getElementById("viewer").style.display = "block";
    document.getElementById("viewer-title").textContent = name + ": scan + anomaly map (radiological)";
    try {
      if (!(window.mimoodVolumes && window.mimoodVolumes[name])) await load(src);
      const d = window.mimoodVolumes[name];
      if (!nv) {
        nv = new niivue.Niivue({ isRadiologicalConvention: true, show3Dcrosshair: true, backColor: [0, 0, 0, 1],
                                 isColorbar: true, loadingText: "loading " + name });
        await nv.attachTo("gl");
      }
      while (nv.volumes.length) nv.removeVolume(nv.volumes[nv.volumes.length - 1]);
      const scan = await niivue.NVImage.loadFromBase64({ base64: d.scan, name: d.scanName, colormap: "gray" });
      const map = await niivue.NVImage.loadFromBase64({ base64: d.map, name: d.mapName, colormap: "warm",
                                                         opacity: 0.7 });
      scan.colorbarVisible = false;
      nv.addVolume(scan);
      nv.addVolume(map);
      nv.setSliceType(nv.sliceTypeMultiplanar);
      if (focus) {
        nv.scene.crosshairPos = nv.mm2frac(focus.split(",").map(Number));
        nv.updateGLVolume();
      }
      document.body.dataset.viewer = "ready " + nv.volumes.length;
    } catch (e) {
      document.body.dataset.viewer = "error: " + e.message;
      document.getElementById("viewer-title").textContent = name + ": " + e.message;
    }
  }
  document.querySelectorAll("button.view").forEach(function (b) {
    b.addEventListener("click", function () { open(b.dataset.name, b.dataset.src, b.dataset.focus); });
  });
  document.getElementById("viewer-close").addEventListener("click", function () {
    document.getElementById("viewer").style.display = "none";
  });
  const m = location.hash.match(/^#view=(.+)$/);
  if (m) {
    const b = Array.from(document.querySelectorAll("button.view"))
      .find(function (x) { return x.dataset.name === decodeURIComponent(m[1]); });
    if (b) open(b.dataset.name, b.dataset.src, b.dataset.focus);
  }
})();
"""
