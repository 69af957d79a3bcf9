"""benchmarks/fashion-mnist/results.py: the table is rebuilt from the run dirs, a hand-written notes block survives,
and a smoke run never writes the real RESULTS.md."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fashion-mnist" / "results.py"


def _results():
    spec = importlib.util.spec_from_file_location("fmnist_results", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_notes_block_survives_a_rebuild(tmp_path):
    results = _results()
    out = tmp_path / "bench"
    out.mkdir()
    (out / "benchmark.json").write_text(json.dumps({"command": "python run.py", "smoke": False}))
    dest = tmp_path / "RESULTS.md"
    notes = "<!-- notes:begin -->\nDeMe did not win here; why.\n<!-- notes:end -->"
    dest.write_text(f"# old title\n\n{notes}\n\nan old table that must go\n")
    results.write(out, dest)
    text = dest.read_text()
    assert text.startswith("# Fashion-MNIST reproduction benchmark: results\n\n" + notes + "\n\n")
    assert "an old table" not in text and "Produced by `python run.py`" in text
    results.write(out, dest)                       # rebuilt again: still one notes block
    assert dest.read_text().count("<!-- notes:begin -->") == 1


def test_smoke_folder_never_writes_results_md(tmp_path):
    results = _results()
    out = tmp_path / "bench"
    out.mkdir()
    (out / "benchmark.json").write_text(json.dumps({"smoke": True}))
    with pytest.raises(SystemExit):
        results.write(out, results.RESULTS_MD)
    assert results.write(out) == out / "RESULTS-smoke.md"
