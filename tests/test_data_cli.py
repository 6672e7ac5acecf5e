"""`mimood-data`: demo, check and preview through click, with their exit codes and one-line errors."""
import shutil

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from mimood.cli.data import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "demo"
    result = CliRunner().invoke(main, ["demo", "-o", str(out), "--n-train", "1", "--n-test", "1", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "wrote 1 healthy training volumes" in result.output
    assert "3 test volumes (1 with" in result.output and "2 healthy" in result.output
    return out


def test_check_good_sets(demo_dir):
    runner = CliRunner()
    r = runner.invoke(main, ["check", str(demo_dir / "test"), "--labels"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().endswith("checked 3 volumes (3 with labels): 3 ok, 0 failed")
    r = runner.invoke(main, ["check", str(demo_dir / "train")])
    assert r.exit_code == 0 and "1 ok, 0 failed" in r.output


def test_check_reports_each_problem_and_exits_1(demo_dir, tmp_path):
    folder = tmp_path / "set"
    shutil.copytree(demo_dir / "test", folder)
    (folder / "labels" / "healthy_test_001.nii.gz").unlink()                          # missing label
    (folder / "images" / "broken.nii.gz").write_bytes(b"\x1f\x8b" + b"junk" * 10)     # corrupt gzip
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5, 2), np.float32), np.eye(4)), folder / "images" / "four_d.nii.gz")
    r = CliRunner().invoke(main, ["check", str(folder), "--labels"])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert lines[-1] == "checked 5 volumes (2 with labels): 2 ok, 3 failed"
    problems = lines[:-1]
    assert any(p.startswith(str(folder / "images" / "broken.nii.gz") + ": corrupt gzip") for p in problems)
    assert any(p.startswith(str(folder / "images" / "four_d.nii.gz") + ": 4-D data") for p in problems)
    assert any(p.startswith(str(folder / "images" / "healthy_test_001.nii.gz") + ": no label found") for p in problems)
    assert not any("Traceback" in line for line in lines)
    # without --labels a missing label is fine
    r = CliRunner().invoke(main, ["check", str(folder)])
    assert r.exit_code == 1 and "3 ok, 2 failed" in r.output


def test_bad_arguments_exit_2(tmp_path):
    r = CliRunner().invoke(main, ["check", str(tmp_path / "absent")])
    assert r.exit_code == 2 and r.output.strip() == f"error: {tmp_path / 'absent'}: no such file or folder"
    r = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "d"), "--n-train", "-1"])
    assert r.exit_code == 2
    (tmp_path / "file").write_text("x")
    r = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "file")])
    assert r.exit_code == 2 and "is not a folder" in r.output


def test_preview_png(demo_dir, tmp_path):
    img = demo_dir / "test" / "images" / "lesion_000.nii.gz"
    label = demo_dir / "test" / "labels" / "lesion_000.nii.gz"
    r = CliRunner().invoke(main, ["preview", str(img), "--label", str(label), "-o", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    png = (tmp_path / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (tmp_path / "bad.nii").write_text("not an image" * 50)
    r = CliRunner().invoke(main, ["preview", str(tmp_path / "bad.nii"), "-o", str(tmp_path / "q.png")])
    assert r.exit_code == 2
    assert r.output.strip() == f"error: {tmp_path / 'bad.nii'}: not a NIfTI file (no NIfTI-1/2 header)"
    assert not (tmp_path / "q.png").exists()


def test_check_reports_a_head_and_prints_warnings(tmp_path):
    from mimood.testing.fuzz import synthetic_scan

    folder = tmp_path / "set"
    folder.mkdir()
    nib.save(synthetic_scan(head=True), folder / "head.nii.gz")
    (folder / "padded.nii").write_bytes(synthetic_scan().to_bytes() + bytes(100))
    r = CliRunner().invoke(main, ["check", str(folder)])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert lines[0].startswith(f"{folder / 'head.nii.gz'}: not skull-stripped? (")
    assert lines[1] == (f"warning: {folder / 'padded.nii'}: 100 zero bytes after the declared 96 x 112 x 30 "
                        "volume ignored")
    assert lines[-1] == "checked 2 volumes (0 with labels): 1 ok, 1 failed"
    r = CliRunner().invoke(main, ["check", str(folder), "--no-skull-check"])
    assert r.exit_code == 0 and r.output.strip().endswith("2 ok, 0 failed")
