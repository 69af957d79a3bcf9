"""Bad input through the command line: one sentence on stderr, exit code 2, no traceback, nothing overwritten."""
import pytest
from typer.testing import CliRunner

from deme_cli.cli import app


@pytest.fixture
def recipe_file(tmp_path, make_recipe):
    f = tmp_path / "r.toml"
    f.write_text(make_recipe(train={"steps": 2}).to_toml())  # run dir: tmp_path / "run"
    return f


def _check(args, expect):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output, r.output
    # a clean exit, not an exception caught by the runner (which would carry its own exit code)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = [l for l in r.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output  # one sentence, nothing else
    assert lines[0].rstrip()[-1] in ".?", lines[0]
    assert expect in lines[0], (expect, lines[0])
    return r


def test_bad_inputs_exit_2_with_one_sentence(recipe_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    broken = tmp_path / "broken.toml"
    broken.write_text("not = [toml\n")
    _check(["train", str(broken), "--range", "0"], "not valid TOML")
    _check(["train", str(recipe_file), "--range", "0", "--set", "train.stepz=3"], "train.steps")
    _check(["train", str(recipe_file), "--range", "0", "--set", "train.steps=many"], "train.steps")
    _check(["train", str(recipe_file), "--range", "0", "--set", "deme.p=1.5"], "deme.p")
    _check(["train", str(recipe_file), "--range", "0", "--set", f"model.pretrained={tmp_path / 'nope'}"],
           "does not exist")
    _check(["train", str(recipe_file), "--range", "7"], "range")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _check(["split", str(recipe_file), "--out", str(blocker / "run")], "cannot be created")
    _check(["split", str(tmp_path / "missing.toml")], "does not exist")
    # nothing in the run directory was written or lost
    assert (run / "keep.txt").read_text() == "precious"
    assert not (run / "ranges").exists()


@pytest.mark.parametrize("value, expect", [
    ('"bogus"', 'must be "uniform", "search" or a list of numbers'),
    ("5", 'must be "uniform", "search" or a list of numbers'),
    ('["a", "b", "c", "d"]', "list of numbers"),
    ("[0.5, 0.5, 0.5, 0.5, 0.5]", "merge.weights has 5 values but ranges.n is"),
])
def test_bad_merge_weights_are_one_sentence(recipe_file, tmp_path, value, expect):
    """merge.weights is "uniform", "search" or one number per range: anything else is refused before any work."""
    r = _check(["merge", str(recipe_file), "--set", f"merge.weights={value}", "--dry-run"], expect)
    assert "merge.weights" in r.output and not (tmp_path / "run").exists()


def test_processes_without_a_search_is_refused_before_anything_is_written(recipe_file, tmp_path):
    _check(["merge", str(recipe_file), "--processes", "2"], 'use it with --search or merge.weights = "search"')
    assert not (tmp_path / "run").exists()
