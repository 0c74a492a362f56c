"""Faults found by trying the tool as a new user: each is one `error:` line with the right exit code,
found before anything starts (no Ray, no study directory left behind), and nothing already written is
lost. Real CLI entry point, real files; no Ray is started by any test here."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.yaml")


def _table(tmp: Path) -> Path:
    """A small indicator table (two searchable layers, one fixed) in LIMPQ's JSON layout."""
    layers = [{"name": f"conv{i}", "params": 1000 * i, "macs": 10_000 * i, "other_macs": 12_000 * i,
               "weight": {str(b): 1.0 / b + i for b in (6, 4, 2)}, "act": {str(b): 0.5 / b + i for b in (6, 4, 2)}}
              for i in (1, 2)]
    d = {"bits": [6, 4, 2], "layers": layers,
         "fixed_layers": {"fc": {"params": 100, "macs": 100, "other_macs": 100}}}
    p = tmp / "ind.json"
    p.write_text(json.dumps(d))
    return p


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_search_out_that_is_a_file_is_one_error(tmp_path, capsys):
    out = tmp_path / "results.txt"
    out.write_text("keep me\n")
    code = main(["search", "--indicators", str(_table(tmp_path)), "--bitops", "w4a4", "--out", str(out), "--no-ray"])
    assert code == 2
    assert "is a file, not a directory" in _one_error_line(capsys) and out.read_text() == "keep me\n"


def test_unknown_macs_column_is_refused(tmp_path, capsys):
    base = ["search", "--indicators", str(_table(tmp_path)), "--bitops", "w4a4", "--out", str(tmp_path / "o"),
            "--no-ray", "--no-progress"]
    assert main(base + ["--macs-column", "nosuch"]) == 2
    err = _one_error_line(capsys)
    assert "no MACs column 'nosuch'" in err and "other_macs" in err
    assert not (tmp_path / "o").exists()
    assert main(base + ["--macs-column", "other_macs"]) == 0  # a column the table has is used


@pytest.mark.parametrize("how", ["cli", "config"])
def test_huge_grid_is_refused_within_a_second(tmp_path, capsys, how):
    spec = "w2a2..w6a6:100000000"
    t0 = time.perf_counter()
    if how == "cli":
        code = main(["search", "--indicators", str(_table(tmp_path)), "--bitops", spec, "--cr", "4..16:3",
                     "--out", str(tmp_path / "o"), "--no-ray"])
    else:
        code = main(["run", DEFAULT, f"study.dir={tmp_path / 's'}", f"search.bitops=[{spec}]"])
    assert time.perf_counter() - t0 < 1.0
    assert code == 2
    err = _one_error_line(capsys)
    assert "100,000,000" in err and "max_points" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_grid_cap_is_configurable(tmp_path, capsys):
    argv = ["search", "--indicators", str(_table(tmp_path)), "--bitops", "w2a2..w6a6:30", "--out",
            str(tmp_path / "o"), "--no-ray", "--no-progress"]
    assert main(argv + ["--max-points", "29"]) == 2
    assert "30 points" in _one_error_line(capsys)
    assert main(argv + ["--max-points", "30"]) == 0


def test_bad_data_root_fails_before_ray_and_leaves_no_study(tmp_path, capsys):
    study = tmp_path / "study"
    t0 = time.perf_counter()
    code = main(["run", DEFAULT, f"study.dir={study}", "data.name=cifar10", "data.root=/nonexistent/cifar",
                 "pretrain.epochs=1"])
    assert code == 2 and time.perf_counter() - t0 < 10
    err = _one_error_line(capsys)
    assert "/nonexistent/cifar" in err and "does not exist" in err
    assert not ray.is_initialized() and not study.exists()


def test_missing_bounds_and_latency_files_fail_before_ray(tmp_path, capsys):
    for override, what in ((f"search.bounds={tmp_path / 'nope.json'}", "bounds file"),
                           (f"search.latency_table={tmp_path / 'nope.csv'}", "latency table")):
        code = main(["run", DEFAULT, f"study.dir={tmp_path / 's'}", override])
        assert code == 2 and what in _one_error_line(capsys)
        assert not ray.is_initialized() and not (tmp_path / "s").exists()


def test_yaml_syntax_error_names_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("study:\n  name: x\nsearch:\n  bitops: [w4a4\n  alpha: 2\n")
    assert main(["run", str(bad)]) == 2
    err = _one_error_line(capsys)
    assert f"{bad}:5:" in err and "not valid YAML" in err


@pytest.fixture
def freeze():
    """Make a directory unwritable: chmod for a normal user; root needs the immutable attribute."""
    frozen = []

    def _freeze(d: Path) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            d.chmod(0o555)
        elif not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode:
            pytest.skip("cannot make a directory unwritable for root here (no chattr +i)")
        frozen.append(d)
        return d

    yield _freeze
    for d in frozen:
        if os.geteuid() != 0:
            d.chmod(0o755)
        else:
            subprocess.run(["chattr", "-i", str(d)], check=True)


def test_unwritable_results_directory_is_one_error_before_any_work(tmp_path, freeze, capsys):
    study = tmp_path / "study"
    results = freeze(study / "results")
    code = main(["run", DEFAULT, f"study.dir={study}"])
    assert code == 2
    err = _one_error_line(capsys)
    assert str(results) in err and "not writable" in err
    assert not (study / "config.yaml").exists() and not ray.is_initialized()


def test_unwritable_search_out_is_one_error(tmp_path, freeze, capsys):
    out = freeze(tmp_path / "out")
    code = main(["search", "--indicators", str(_table(tmp_path)), "--bitops", "w4a4", "--out", str(out), "--no-ray"])
    assert code == 2 and str(out) in _one_error_line(capsys)


def test_unexpected_error_is_one_line_and_a_traceback_file(tmp_path, monkeypatch, capsys):
    """A bug (here: the report builder raising) is one line naming the error and where its traceback
    went, exit 1 — not a bare traceback."""
    import orchestrator.report as report

    def broken(study_dir):
        raise KeyError("frontier")

    monkeypatch.setattr(report, "build_report", broken)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert main(["report", str(tmp_path)]) == 1
    err = _one_error_line(capsys)
    assert err.startswith("error: KeyError: 'frontier' (details in ") and err.endswith("error.log)")
    log = Path(err.rsplit("details in ", 1)[1][:-1])
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "KeyError: 'frontier'" in text


def test_status_of_a_non_study_is_one_error(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "not a study directory" in _one_error_line(capsys)


def test_cli_prints_no_traceback_for_bad_input_in_a_subprocess(tmp_path):
    """The same through the installed entry point: stderr is exactly one line."""
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "search", "--indicators",
                          str(_table(tmp_path)), "--bitops", "w2a2..w6a6:100000000", "--out", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_unwritable_checkpoint_storage_is_one_error(tmp_path, freeze, capsys):
    storage = freeze(tmp_path / "ckpt")
    code = main(["run", DEFAULT, f"study.dir={tmp_path / 's'}", f"resources.storage_path={storage}"])
    assert code == 2
    err = _one_error_line(capsys)
    assert "resources.storage_path" in err and str(storage) in err and not ray.is_initialized()
    assert not (tmp_path / "s").exists()
