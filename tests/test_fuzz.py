"""The fuzz suite's CI slice: every hand-made edge case and 40 seeded mutations of a small scan go through
loading, the skull check and preprocessing, and each does what it must (mimood.testing.fuzz); a quarter of a set
goes through mimood-infer and is judged as benchmarks/fuzz_infer.py judges the full set (mimood.testing.judge)."""
import hashlib

import pytest

from mimood.data.discover import discover
from mimood.testing.fuzz import load_outcome, make_inputs, problems, synthetic_scan


@pytest.fixture(scope="module")
def fuzz_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "inputs"
    return folder, make_inputs(folder, synthetic_scan(), seed=0, n_mutations=40, bomb_bytes=256 << 20)


def test_every_input_is_mapped_or_refused_as_it_must(fuzz_set):
    folder, inputs = fuzz_set
    found, counts = [], {}
    for inp in inputs:
        outcome = load_outcome(folder / inp.name)
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
        found += problems(inp, outcome, folder / inp.name)
    assert found == []
    assert counts.get("crash", 0) == 0 and counts["ok"] > 40 and counts["refused"] > 50


def test_every_input_is_a_case(fuzz_set):
    """Nothing vanishes from a run: links, loops and folders named like scans are cases (refused later), and
    output names are unique ignoring case."""
    folder, inputs = fuzz_set
    cases = discover(folder)
    assert sorted(str(c.image) for c in cases) == sorted(str(folder / i.name) for i in inputs)
    names = [c.name.casefold() for c in cases]
    assert len(set(names)) == len(names) and not set(names) & {n + "_mask" for n in names}


def test_same_seed_same_bytes(tmp_path):
    def digest(folder, seed):
        inputs = make_inputs(folder, synthetic_scan(shape=(30, 32, 10)), seed=seed, n_mutations=20,
                             bomb_bytes=1 << 20, collisions=False)
        h = hashlib.sha256()
        for i in inputs:
            p = folder / i.name
            h.update(i.name.encode() + (p.read_bytes() if p.is_file() else b""))
        return h.hexdigest()

    assert digest(tmp_path / "a", 3) == digest(tmp_path / "b", 3) != digest(tmp_path / "c", 4)


def test_a_slice_through_mimood_infer(tmp_path_factory):
    """A quarter of the hand-made inputs and mutations, every bomb, link, collision, awkward name and the whole head,
    through `mimood-infer` as benchmarks/fuzz_infer.py runs the full set (mimood.testing.judge): a row for every
    input, none mapped that must be refused or warned about, no output shared, no partial file, no unexpected
    error, no traceback or stray line on screen, exit 1."""
    from click.testing import CliRunner

    from mimood.cli.infer import main
    from mimood.testing.judge import judge_folder
    from test_runtime import tiny_export_folder

    export = tiny_export_folder(tmp_path_factory)
    folder = tmp_path_factory.mktemp("fuzz_slice") / "inputs"
    inputs = make_inputs(folder, synthetic_scan(shape=(36, 44, 10)), seed=1, n_mutations=12, bomb_bytes=64 << 20)
    always = {"bomb", "link", "collision", "head", "name"}
    keep = [i for k, i in enumerate(inputs) if i.kind in always or k % 4 == 0 or i.name == "no_codes.nii.gz"]
    for i in inputs:
        if i not in keep:
            p = folder / i.name
            p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
    out = folder.parent / "out"
    res = CliRunner().invoke(main, [str(folder), "-o", str(out), "-m", str(export), "--backend", "ort"])
    assert res.exit_code == 1 and res.exception is None or isinstance(res.exception, SystemExit), res.output
    verdict = judge_folder(keep, folder, out, res.output, with_mask=True)
    assert verdict["inputs"] >= 35 and verdict["outcomes"]["ok"] >= 15 and verdict["outcomes"]["failed"] >= 15
    assert {k: verdict[k] for k in ("missing", "partial", "silent_wrong", "unexpected", "stray", "tracebacks")} == \
        {"missing": [], "partial": [], "silent_wrong": [], "unexpected": [], "stray": [], "tracebacks": 0}
