"""mimood.thresholds: calibration and manifest numbers are finite, in range and numbers, checked where they are
written and read, with one-line errors naming the file and the key."""
import json
import math

import pytest

from mimood.config import preset
from mimood.errors import InputError
from mimood.export import export as ex
from mimood.thresholds import check_calibration, check_manifest_values, read_calibration

GOOD = {"lam": 0.2, "threshold": 0.3, "methods": {"mimood": {"lam": 0.2, "threshold": 0.3},
                                                 "ar": {"lam": 6.0, "threshold": 0.25},
                                                 "intensity": {"threshold": 0.9}}}


def _write(tmp_path, text):
    path = tmp_path / "calibration.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,problem", [
    ('{"lam": 0.2, "threshold": NaN}', "'threshold' must be a number in [0, 1] (or null), got NaN"),
    ('{"lam": NaN, "threshold": 0.3}', "'lam' must be a number in [0, 1], got NaN"),
    ('{"lam": 0.2, "threshold": "high"}', "'threshold' must be a number in [0, 1] (or null), got \"high\""),
    ('{"lam": "x", "threshold": 0.3}', "'lam' must be a number in [0, 1], got \"x\""),
    ('{"lam": true, "threshold": 0.3}', "'lam' must be a number in [0, 1], got true"),
    ('{"lam": 0.2, "threshold": 1.5}', "'threshold' must be a number in [0, 1] (or null), got 1.5"),
    ('{"lam": 0.2, "threshold": Infinity}', "got Infinity"),
    ('{"lam": 0.2}', "missing 'threshold'"),
    ('[1, 2]', "calibration must be a JSON object"),
    ('{"lam": 0.2, "threshold": 0.3, "methods": {"ar": {"lam": -1, "threshold": 0.2}}}',
     "'methods.ar.lam' must be a number >= 0, got -1"),
    ('{"lam": 0.2, "threshold": 0.3, "methods": {"ar": {"lam": 6}}}', "missing 'methods.ar.threshold'"),
    ('{"lam": 0.2, "threshold": ', "not valid JSON"),
])
def test_bad_calibration_is_one_line_naming_file_and_key(tmp_path, text, problem):
    path = _write(tmp_path, text)
    with pytest.raises(InputError) as err:
        read_calibration(path)
    assert str(err.value).startswith(f"{path}: ") and problem in str(err.value) and "\n" not in str(err.value)


def test_good_calibration_and_absent_file(tmp_path):
    assert read_calibration(tmp_path / "calibration.json") is None
    assert read_calibration(_write(tmp_path, json.dumps(GOOD))) == GOOD
    assert read_calibration(_write(tmp_path, '{"lam": 0, "threshold": null}'))["threshold"] is None
    assert check_calibration(dict(GOOD), "x") == GOOD


def test_load_calibration_checks(tmp_path):
    from mimood.eval.calibrate import load_calibration

    _write(tmp_path, '{"lam": 0.2, "threshold": NaN}')
    with pytest.raises(InputError, match=r"calibration\.json: 'threshold' must be"):
        load_calibration(tmp_path)


def test_manifest_values():
    d = {"lam": 0.01, "threshold": None, "T": 8, "R": 4, "batch": 32, "min_pool": 3, "avg_pool": 7,
         "temperature": 1.0, "vocab_size": 256, "mask_id": 256}
    assert check_manifest_values(dict(d), "m.json") == d
    for key, value, problem in (("T", 2.5, "'T' must be an integer >= 0, got 2.5"),
                                ("R", 0, "'R' must be an integer >= 1, got 0"),
                                ("temperature", 0.0, "'temperature' must be a number > 0, got 0.0"),
                                ("lam", math.nan, "'lam' must be a number in [0, 1], got NaN"),
                                ("mask_id", 255, "'mask_id' must equal 'vocab_size' (256), got 255")):
        with pytest.raises(InputError) as err:
            check_manifest_values({**d, key: value}, "m.json")
        assert str(err.value) == f"m.json: {problem}"


def test_export_refuses_bad_calibration_and_a_config_its_checkpoints_disagree_with(tmp_path):
    from test_export_graphs import make_random_run

    run = make_random_run(tmp_path / "run")
    (run / "calibration.json").write_text('{"lam": "x", "threshold": 0.2}')
    with pytest.raises(InputError) as err:
        ex.export_run(run, progress=False)
    assert str(err.value) == f"{run / 'calibration.json'}: 'lam' must be a number in [0, 1], got \"x\""

    (run / "calibration.json").write_text('{"lam": 0.01, "threshold": 0.2}')
    preset("cpu").save(run / "config.json")                   # tiny checkpoints, cpu config
    with pytest.raises(InputError) as err:
        ex.export_run(run, progress=False)
    assert str(err.value).startswith(f"{run / 'vqvae' / 'best.safetensors'}: trained with vqvae.channels = "
                                     f"[8, 8, 16], but {run / 'config.json'} (preset 'cpu') says [16, 32, 64] (and ")
    assert str(err.value).endswith("a checkpoint from another run?")
    assert not (run / "export").exists()
