"""Find the volumes (and their labels) of a data set, whatever of three common layouts it uses.

- BraTS-style: `<case>_<modality>.nii.gz` beside `<case>_seg.nii.gz` (and other modalities); only the
  chosen modality's files are cases, seg files never are.
- `images/` + `labels/`: matching file names (`.nii` and `.nii.gz` may differ).
- a plain folder of volumes, searched recursively; `*_seg`, `*_label`, `*_mask` files are never images,
  and `<name>_seg` / `<name>_label` beside a volume is its label.
A single file is one case. Hidden files and folders (such as half-written `.x.tmp-*.nii.gz`) are ignored.
Broken or looping symbolic links and folders named like volumes are cases too, so that the reader refuses them
with a reason (one report row each) instead of their vanishing from the run; symbolic links to folders are not
followed.

A case's name is the base of its output files (`<name>.nii[.gz]`, `<name>_mask.nii.gz`, `<name>.png`), so names
are made unique even on a case-insensitive disk (`_unique_names`).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mimood.config import DataConfig
from mimood.data.checks import skull_check
from mimood.data.io import load_volume
from mimood.data.preprocess import preprocess
from mimood.errors import InputError

BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
NOT_IMAGES = ("_seg", "_label", "_mask")      # name endings that mark labels and masks
_SUFFIX = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


@dataclass
class Case:
    name: str                 # output base name: the file name without .nii[.gz]
    image: Path
    label: Path | None
    expected_label: str = ""  # where a label was looked for (for "no label found" messages)


def discover(root: str | Path, modality: str = "t2", require_labels: bool = False) -> list[Case]:
    """The cases under `root` (a folder or one file), sorted by path. See the module docstring."""
    root = Path(root)
    if not root.exists():
        raise InputError(root, "no such file or folder")
    if root.is_file():
        cases = [_single(root, modality)]
    elif (root / "images").is_dir():
        cases = _images_labels(root)
    elif root.name == "images" and (root.parent / "labels").is_dir():
        cases = _images_labels(root.parent)
    else:
        volumes = _volumes(root)
        if not volumes:
            raise InputError(root, "no .nii or .nii.gz volumes found")
        cases = _brats(root, volumes, modality) if _is_brats(volumes, modality) else _plain(root, volumes)
    if require_labels:
        missing = [c for c in cases if c.label is None]
        if missing:
            more = f" ({len(missing) - 1} more cases lack labels)" if len(missing) > 1 else ""
            raise InputError(missing[0].image, f"no label found (expected {missing[0].expected_label}){more}")
    return cases


def stem(path: Path) -> str:
    """File name without `.nii` / `.nii.gz` (or without its last suffix for other files)."""
    name = path.name
    m = _SUFFIX.search(name)
    return name[: m.start()] if m else path.stem


def _volumes(folder: Path) -> list[Path]:
    """Every non-hidden .nii/.nii.gz entry under `folder`, recursively, sorted: files, links (broken ones too)
    and folders with such a name (module docstring)."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).parts
        if any(part.startswith(".") for part in rel) or not _SUFFIX.search(p.name):
            continue
        if p.is_file() or p.is_symlink() or p.is_dir():
            out.append(p)
    return sorted(out)


def _find(folder: Path, name: str) -> Path | None:
    for suffix in (".nii.gz", ".nii"):
        if (folder / (name + suffix)).is_file():
            return folder / (name + suffix)
    return None


def _single(path: Path, modality: str) -> Case:
    """One file: look for its label as the layouts would place it."""
    s = stem(path)
    if path.parent.name == "images":
        labels = path.parent.parent / "labels"
        return Case(s, path, _find(labels, s), f"{labels / s}.nii.gz")
    if s.lower().endswith("_" + modality.lower()):
        base = s[: -len(modality) - 1]
        return Case(s, path, _find(path.parent, base + "_seg"), f"{path.parent / base}_seg.nii.gz")
    return _plain_case(path, s)


def _images_labels(root: Path) -> list[Case]:
    images, labels = root / "images", root / "labels"
    volumes = _volumes(images)
    if not volumes:
        raise InputError(images, "no .nii or .nii.gz volumes found")
    cases = []
    for p in volumes:
        rel = p.relative_to(images)
        s = stem(p)
        folder = labels / rel.parent
        cases.append(Case(s, p, _find(folder, s), f"{folder / s}.nii.gz"))
    return _unique_names(cases, images)


def _is_brats(volumes: list[Path], modality: str) -> bool:
    """BraTS-style when some case prefix has two or more of <prefix>_{t1,t1ce,t2,flair,seg,modality}."""
    suffixes = set(BRATS_MODALITIES) | {"seg", modality.lower()}
    seen: dict[tuple[Path, str], int] = {}
    for p in volumes:
        base, _, suffix = stem(p).lower().rpartition("_")
        if base and suffix in suffixes:
            key = (p.parent, base)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] >= 2:
                return True
    return False


def _brats(root: Path, volumes: list[Path], modality: str) -> list[Case]:
    tail = "_" + modality.lower()
    cases = []
    for p in volumes:
        s = stem(p)
        if s.lower().endswith(tail):
            base = s[: -len(tail)]
            cases.append(Case(s, p, _find(p.parent, base + "_seg"), f"{p.parent / base}_seg.nii.gz"))
    if not cases:
        present = sorted({stem(p).lower().rpartition("_")[2] for p in volumes} - {"seg"})
        raise InputError(root, f"BraTS-style folder without *{tail}.nii[.gz] files "
                               f"(found: {', '.join(present)}; choose one with --modality)")
    return _unique_names(cases, root)


def _plain(root: Path, volumes: list[Path]) -> list[Case]:
    cases = [_plain_case(p, stem(p)) for p in volumes if not stem(p).lower().endswith(NOT_IMAGES)]
    if not cases:
        raise InputError(root, "only label/mask volumes found (*_seg, *_label, *_mask), no images")
    return _unique_names(cases, root)


def _plain_case(path: Path, s: str) -> Case:
    label = _find(path.parent, s + "_seg") or _find(path.parent, s + "_label")
    return Case(s, path, label, f"{path.parent / s}_seg.nii.gz or {s}_label.nii.gz beside it")


def _unique_names(cases: list[Case], root: Path) -> list[Case]:
    """Sorted by path, with output names that cannot clash, compared case-insensitively: where names clash the
    relative folders are prefixed (`sub__b`), then, between files whose suffixes differ, the suffix is added
    (`a_nii`, `a_nii_gz`), and any clash left (`Case` and `case`, a file named `sub__b` beside `sub/b`, `a_mask`
    beside the mask of `a`) gets `__2`, `__3`, ... in path order."""
    cases = sorted(cases, key=lambda c: str(c.image))
    for group in _clashes(cases):
        for c in group:
            c.name = "__".join(c.image.relative_to(root).parent.parts + (c.name,))
    for group in _clashes(cases):
        if len({_suffix(c.image) for c in group}) > 1:
            for c in group:
                c.name = f"{c.name}_{_suffix(c.image).lstrip('.').replace('.', '_').lower()}"
    used: set[str] = set()
    for c in cases:
        name, k = c.name, 1
        while {name.casefold(), f"{name}_mask".casefold()} & used:
            k += 1
            name = f"{c.name}__{k}"
        c.name = name
        used |= {name.casefold(), f"{name}_mask".casefold()}
    return cases


def _clashes(cases: list[Case]) -> list[list[Case]]:
    """Groups of cases whose names are equal ignoring case."""
    count = Counter(c.name.casefold() for c in cases)
    groups: dict[str, list[Case]] = {}
    for c in cases:
        if count[c.name.casefold()] > 1:
            groups.setdefault(c.name.casefold(), []).append(c)
    return list(groups.values())


def _suffix(path: Path) -> str:
    m = _SUFFIX.search(path.name)
    return m.group(0) if m else path.suffix


def check_case(case: Case, cfg: DataConfig, require_label: bool = False, skull: bool = True) -> list[str]:
    """Problems ("path: problem" lines) that would stop this case from being used; [] when it is fine.

    Runs the whole preprocessing (with the label, when there is one), so a case that passes will load, and (with
    `skull`) the skull-stripping check (`mimood.data.checks`). Warnings about a usable file (`InputWarning`)
    are not problems: they go through `warnings.warn`.
    """
    problems = []
    if case.label is None and require_label:
        problems.append(str(InputError(case.image, f"no label found (expected {case.expected_label})")))
    try:
        image = load_volume(case.image)
        if skull and not (result := skull_check(image)).stripped:
            problems.append(str(InputError(case.image, result.message())))
        preprocess(image, cfg, label=case.label)
    except InputError as e:
        problems.append(str(e))
    return problems
