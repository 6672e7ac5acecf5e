"""The README's Python API example, run as written (on the tiny export and a small synthetic scan), and its
command table in the vocabulary the commands accept."""
import re
from pathlib import Path

import pytest

from test_infer import write_scan
from test_runtime import tiny_export_folder

README = Path(__file__).resolve().parents[1] / "README.md"


def example(marker: str) -> str:
    text = README.read_text()
    start = text.index(f"<!-- example: {marker}")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block, f"no python block after the {marker} marker"
    return block[1]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return tiny_export_folder(tmp_path_factory)


def test_python_api_example_runs_as_written(export, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("scans").mkdir()
    write_scan(Path("scans") / "case1.nii.gz", seed=30)
    Path("export").symlink_to(export, target_is_directory=True)
    exec(compile(example("python-api"), "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    name, status, scan_score, raw, flagged = out[0].split()
    assert (name, status) == ("case1", "ok") and scan_score == "None" and float(raw) > 0 and float(flagged) > 0
    assert out[1] == "maps/report.csv 0 failed"
    assert Path("maps/index.html").is_file() and Path("maps/case1.nii.gz").is_file()


def test_command_table_uses_the_one_vocabulary():
    table = README.read_text().split("## Commands", 1)[1].split("###", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `mimood-")]
    assert len(rows) >= 9
    for old in ("--out ", "--run ", "--data ", "--json ", "--export ", "--run-dir"):
        assert not any(old in r for r in rows), old
