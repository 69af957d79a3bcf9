"""benchmarks/fashion-mnist/results.py: the table is rebuilt from the run dirs, a hand-written notes block survives,
and a smoke run never writes the real RESULTS.md. benchmarks/results_md.py: JSON -> the GPU/CPU blocks of
benchmarks/RESULTS.md."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH / "fashion-mnist" / "results.py"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod             # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _results():
    return _load("fmnist_results", SCRIPT)


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


def test_results_md_replaces_only_the_gpu_block_and_names_each_source(tmp_path):
    md = _load("results_md", BENCH / "results_md.py")
    head = {"device": "NVIDIA H200", "device_type": "cuda", "torch": "2.11.0", "diffusers": "0.42.1"}
    train = dict(head, benchmark="throughput", created="2026-11-26T15:28:47", quick=False,
                 rows=[{"arch": "lsun256", "res": 256, "batch": 16, "variant": v, "img_per_s": ips,
                        "ms_per_step": 16000 / ips, "peak_gib": 1.0} for v, ips in (("authors", 55.55), ("ours", 112.15))],
                 ratios={"lsun256": {"ours_over_authors": 2.019}})
    sample = dict(head, benchmark="sample_throughput", steps=50, batch=1024, precision="bf16", quick=False,
                  rows=[{"variant": "compiled", "img_per_s": 499.53, "warmup_s": 37.2}],
                  ratios={"compiled_over_eager": 2.216})
    (tmp_path / "run2-train.json").write_text(json.dumps(train))
    (tmp_path / "run2-sample.json").write_text(json.dumps(sample))
    dest = tmp_path / "RESULTS.md"
    cpu = "<!-- cpu-results:begin -->\nCPU rows stay\n<!-- cpu-results:end -->"
    dest.write_text(f"intro\n<!-- gpu-results:begin -->\nold GPU rows\n<!-- gpu-results:end -->\nnotes\n{cpu}\n")
    md.update(dest, md.render([tmp_path / "run2-train.json", tmp_path / "missing.json", tmp_path / "run2-sample.json"]))
    text = dest.read_text()
    assert "old GPU rows" not in text and cpu in text and text.startswith("intro\n") and "\nnotes\n" in text
    assert "`python benchmarks/throughput.py --archs lsun256` (2026-11-26 15:28, `results/run2-train.json`):" in text
    assert "| lsun256 | 16 | ours | 112.15 |" in text and "ours / authors = **2.02x**" in text
    assert "`python benchmarks/sample_throughput.py` (`results/run2-sample.json`):" in text
    assert text.index("run2-train.json") < text.index("run2-sample.json")     # the order the files were given
    assert "compiled / eager = **2.22x**" in text
    other = tmp_path / "no-blocks.md"
    other.write_text("no markers here\n")
    with pytest.raises(SystemExit):                 # a file without the block is refused, not appended to
        md.update(other, md.render([tmp_path / "run2-sample.json"]))
    assert other.read_text() == "no markers here\n"


def test_paired_differences_are_taken_within_each_seed():
    results = _results()

    def e(seed, fid):
        return {"seed": seed, "fid": fid, "kid": None}
    table = [{"label": "(a) base", "seeds": [e(0, 20.0), e(1, 22.0)]},
             {"label": "(b) N = 1", "seeds": [e(0, 19.0), e(1, 23.0)]},
             {"label": "(d) merged", "seeds": [e(1, 21.5)]}]          # seed 0 missing
    diffs = results.paired(table, [0, 1], "(a)", "fid")
    assert diffs == {"(b) N = 1": [-1.0, 1.0], "(d) merged": [None, -0.5]}
    assert results.mean_spread(diffs["(b) N = 1"]) == (0.0, 1.0)
    lines = "\n".join(results._paired_table(table, [0, 1]))
    assert "| (d) merged | -, -0.50 (-0.50) | -, -1.50 (-1.50) | - | - |" in lines


def test_a_resumed_run_dir_is_charged_each_stages_work_once(tmp_path):
    """run.json keeps a kept stage's seconds of the call that did its work, and run.py logs them again per call: the
    provenance counts that work once, and adds a stage that a later call did again (--force, or a new stage)."""
    results = _results()
    work = {"split": 0.0, "train": 4.41, "merge": 0.0}
    calls = [{"stages": work},                                                     # stopped during sampling
             {"stages": {**work, "sample": 668.87, "eval": 1316.86}},
             {"stages": {**work, "sample": 668.87, "eval": 1316.86}},              # resumed: all kept
             {"stages": {**work, "sample": 668.87, "eval": 20.5}}]                 # eval done again
    assert results.stage_seconds(calls) == pytest.approx(
        {"split": 0.0, "train": 4.41, "merge": 0.0, "sample": 668.87, "eval": 1316.86 + 20.5})
    run_dir = tmp_path / "n1-all-timesteps"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "range-0.json").write_text(json.dumps({"model": "range:0", "metrics": {"fid": 9.2}}))
    (run_dir / "command.json").write_text(json.dumps({"command": "deme run x", "calls": calls}))
    [entry] = results.collect(tmp_path)
    assert entry["calls"] == 4 and entry["stages"]["sample"] == pytest.approx(668.87)
    assert "sample 669, eval 1337" in "\n".join(results._provenance([entry]))


def test_lora_size_report_matches_a_hand_count():
    """benchmarks/lora_cost.py's size report on conftest's tiny UNet2DModel (channels 16, 32), counted by hand: each
    adapted layer adds rank * (in * k * k + out) (A: r x in x k x k, B: out x r). The 3x3 ResNet convs
    (in -> out): down 16->16 twice, 16->32 and 32->32, mid 32->32 four times, up (skip-concatenated inputs) 64->32,
    32->32, 48->32, 32->32, 48->16, 16->16, 32->16, 16->16; and 4 attention blocks (down, mid, up x 2) of 4 Linear
    32->32 (to_q, to_k, to_v, to_out.0): 20 convs + 16 linears = 32 layers."""
    from conftest import TINY_UNET

    lora_cost = _load("lora_cost", BENCH / "lora_cost.py")
    convs = [(16, 16), (16, 16), (16, 32), (32, 32)] + [(32, 32)] * 4 + [
        (64, 32), (32, 32), (48, 32), (32, 32), (48, 16), (16, 16), (32, 16), (16, 16)]
    per_rank = sum(i * 9 + o for i, o in convs) + 16 * (32 + 32)
    assert per_rank == 5904
    s = lora_cost.lora_sizes("UNet2DModel", TINY_UNET, ranks=(4, 8))
    assert s["projection_params"] == 16 * 16 + 32 * 32 + 32 * 32 + 32 * 32 + 16 * 16   # C^2: down, mid, up
    assert s["targets"] == ["conv1", "conv2", "to_k", "to_out.0", "to_q", "to_v"]
    for r in (4, 8):
        x = s["ranks"][r]
        assert x["adapted_layers"] == 32
        assert x["adapter_params"] == r * per_rank and x["adapter_bytes_fp32"] == 4 * r * per_rank
        assert x["folder_bytes_fp32"] == 4 * (r * per_rank + s["projection_params"])


# --- issue 26: the keep-the-gain section, the objectives study's fits, run.py's suite -----------------------------

def _entry(recipe, model, seed, fid, kid=None, loss=None, images=5000):
    return {"recipe": recipe, "seed": seed, "run": recipe if seed == 0 else f"{recipe}-seed{seed}", "model": model,
            "fid": fid, "kid": kid, "kid_std": None if kid is None else kid / 10, "loss_ratio": loss,
            "loss_by_t": None, "images": images, "reference": {}, "sampler": "DDIM-50, fp32", "weights": None,
            "search": None, "command": None, "hardware": None, "stages": {}, "calls": 0}


def test_keep_the_gain_section_is_placed_above_the_history_and_rebuilt_alone(tmp_path, monkeypatch):
    """The first write puts the section under the title and the whole earlier file below a history heading, byte for
    byte; a rebuild replaces only the section and keeps the notes written into it; rebuilding the old table keeps
    the section too."""
    results = _results()
    old = "# Fashion-MNIST reproduction benchmark: results\n\n<!-- notes:begin -->\nold reading\n<!-- notes:end -->" \
          "\n\n| row | FID |\n|---|---|\n| (a) base | 20.25 |\n"
    dest = tmp_path / "RESULTS.md"
    dest.write_text(old)
    out = tmp_path / "bench"
    out.mkdir()
    (out / "benchmark.json").write_text(json.dumps({"command": "python run.py --suite keep-the-gain",
                                                    "suite": "keep-the-gain", "smoke": False}))
    found = [_entry("n1-all-timesteps", "base", s, 20.0 + s, 3e-3) for s in (0, 1)] + \
        [_entry("n1-all-timesteps", "range:0", s, 20.1 + s, 3e-3) for s in (0, 1)] + \
        [_entry("deme", "ensemble", s, 19.8 + s, 2.9e-3) for s in (0, 1)] + \
        [_entry("n1-all-timesteps-4x", "range:0", s, 20.0 + s, 3e-3) for s in (0, 1)] + \
        [_entry("deme-4x", "ensemble", s, 19.6 + s, 2.8e-3) for s in (0, 1)]
    monkeypatch.setattr(results, "collect", lambda out: found)
    results.write(out, dest)
    text = dest.read_text()
    head, _, rest = text.partition(results.SECTION_END)
    assert text.startswith("# Fashion-MNIST reproduction benchmark: results\n\n" + results.SECTION_BEGIN)
    assert rest == "\n\n" + results.HISTORY + "\n\n" + old.partition("\n\n")[2]      # the earlier file, unchanged
    assert "| 5000 |" in head and "8,000 total finetuning steps" in head
    # ensemble - N = 1: -0.30 at 2,000 steps, -0.40 at 8,000 (both seeds)
    assert "| ensemble | -0.30 ± 0.00 | -0.40 ± 0.00 |" in head
    notes = "<!-- keep-the-gain-notes:begin -->\nwhat it means\n<!-- keep-the-gain-notes:end -->"
    dest.write_text(text.replace(results.SECTION_BEGIN + "\n", results.SECTION_BEGIN + "\n" + notes + "\n\n", 1))
    found[0] = _entry("n1-all-timesteps", "base", 0, 25.0, 3e-3)
    results.write(out, dest)
    again = dest.read_text()
    assert again.count(results.SECTION_BEGIN) == 1 and notes in again and "| 25.00 |" in again
    assert again.endswith(rest)
    # the old table's own rebuild (another benchmark folder) keeps the section above it
    (out / "benchmark.json").write_text(json.dumps({"command": "python run.py", "smoke": False}))
    monkeypatch.setattr(results, "collect", lambda out: [])
    results.write(out, dest)
    rebuilt = dest.read_text()
    assert rebuilt.count(results.SECTION_BEGIN) == 1 and notes in rebuilt and "old reading" in rebuilt
    # before any run at 4x the budget has numbers, the section has no 4x part (the base, row (a), is in both lists)
    (out / "benchmark.json").write_text(json.dumps({"command": "python run.py --suite keep-the-gain",
                                                    "suite": "keep-the-gain", "smoke": False}))
    monkeypatch.setattr(results, "collect", lambda out: found[:6])
    results.write(out, dest)
    section = results.SECTION.search(dest.read_text()).group(0)
    assert "| 5000 |" in section and "(c) DeMe" in section and "4x the budget:" not in section
    assert "8,000" not in section and "8000" not in section


def _objectives():
    sys.path.insert(0, str(BENCH / "fashion-mnist"))
    return _load("fmnist_objectives", BENCH / "fashion-mnist" / "objectives.py")


def _record(fid, ratios, kid=1e-3):
    return {"test": {"fid": fid, "kid": kid, "steps": 50},
            "objectives": {"loss_by_t": {"score": sum(ratios) / len(ratios), "ratios": ratios, "cpu_s": 2.0}}}


def test_study_fits_bin_weights_and_tolerance_on_one_seed():
    """FID made a known non-negative combination of the per-bin ratios: the fitted bin weights are that combination
    (normalised); the fitted tolerance is the smallest of the grid with the best rank correlation, and the guarded
    and weighted scores are the engine's own rules."""
    import numpy as np

    study = _objectives()
    rng = np.random.default_rng(0)
    true = np.array([4.0, 1.0, 0.0, 0.0, 3.0])
    records = {"theta": _record(20.0, [1.0] * 5)}
    for k in range(12):
        r = 1.0 + rng.normal(0, 0.002, 5)
        records[f"c{k}"] = _record(20.0 + float(true @ (r - 1.0)), [float(x) for x in r])
    tolerance, weights = study.fit(records)
    assert weights == pytest.approx(list(true / true.sum()), abs=1e-6)
    assert tolerance in study.TOLERANCES
    names = sorted(records)
    fid = [records[c]["test"]["fid"] for c in names]
    rho = {t: study.spearman([study.bin_variant_scores(records, "loss_by_t_guarded", t, None)[c] for c in names], fid)
           for t in study.TOLERANCES}
    assert rho[tolerance] == max(rho.values()) and all(rho[t] < rho[tolerance] for t in study.TOLERANCES
                                                        if t < tolerance)
    weighted = study.bin_variant_scores(records, "loss_by_t_weighted", 0.0, weights)
    assert study.spearman([weighted[c] for c in names], fid) == pytest.approx(1.0)
    assert study.objective_sets("loss_by_t_weighted", study.FULL, tolerance, weights, 50)[-1] == \
        f"merge.bin_weights={json.dumps(weights)}"
    assert study.objective_sets("kid@1000", study.FULL, tolerance, weights, 50) == \
        ['merge.objective="kid"', "merge.search_num_images=1000", "merge.search_steps=50"]


def test_keep_the_gain_suite_trains_with_the_recipes_values_and_paths():
    """run.py's `deme run --set` values for the suite: the data and base paths and the seed only, as the recipes'
    training was started (`deme train` with the same paths and seeds resumes); 4x recipes hold 8,000 steps; row (f)
    searches; the 4x N = 1 run dir samples only its finetuned model; the loss-only models exist in each run dir."""
    from deme_cli.engine.recipe import tomllib     # tomli on Python 3.10

    sys.path.insert(0, str(BENCH / "fashion-mnist"))
    bench = _load("fmnist_run", BENCH / "fashion-mnist" / "run.py")
    out = Path("/somewhere/fmnist-bench")
    sets = bench.deme_sets("deme-4x", 1, out=out, base="assets/fmnist-ddpm", scale="cpu-5k", smoke=False,
                           suite="keep-the-gain")
    assert sets[:6] == ['model.pretrained="assets/fmnist-ddpm"', 'data.path="/somewhere/fmnist-bench/data/train"',
                        'merge.search_reference="/somewhere/fmnist-bench/data/holdout-2k"',
                        'eval.reference="/somewhere/fmnist-bench/data/test"', "seed=1", "sample.seed=1000000"]
    assert not any(s.startswith(("train.", "deme.", "ranges.", "data.")) for s in sets[6:])
    assert "sample.num_images=5000" in sets and "sample.steps=50" in sets
    for name, steps in (("deme-4x", 2000), ("n1-all-timesteps-4x", 8000)):
        cfg = tomllib.loads(bench.recipe_file(name).read_text())
        assert cfg["train"]["steps"] == steps and cfg["ranges"]["n"] * steps == bench.budget(name) == 8000
    chosen = bench.deme_sets("deme-4x-chosen", 0, out=out, base="b", scale="cpu-5k", smoke=False,
                             suite="keep-the-gain")
    assert bench.recipe_file("deme-4x-chosen").name == "deme-4x.toml" and bench.DERIVED["deme-4x-chosen"] == "deme-4x"
    assert 'merge.weights="search"' in chosen and 'merge.search="coordinate"' in chosen
    assert bench.effective_models("n1-all-timesteps-4x", "keep-the-gain") == ["range:0"]
    assert bench.effective_models("deme-lora", "keep-the-gain") == ["ensemble"]
    assert bench.loss_only_models("deme-lora", "keep-the-gain") == ["ensemble", "range:0", "range:1", "range:2",
                                                                     "range:3"]
    assert bench.loss_only_models("deme-lora", "table") == ["merged", "ensemble", "range:0", "range:1", "range:2",
                                                            "range:3"]
    assert bench.loss_only_models("deme-chosen", "keep-the-gain") == []


def test_keep_the_gain_runs_row_f_right_after_its_range_models_once_the_study_is_complete(tmp_path, monkeypatch):
    """With objectives.py's summary complete, run.py's first pass holds rows (f): deme-chosen in deme's chain with the
    study's chosen --set values (and no other run dir has them), taken after the single 5,000-sample rows and before
    the 4x training; without a summary, the first pass has no row (f) (the study runs first)."""
    sys.path.insert(0, str(BENCH / "fashion-mnist"))
    bench = _load("fmnist_run", BENCH / "fashion-mnist" / "run.py")
    out = tmp_path / "bench"
    monkeypatch.setattr(bench, "make_data", lambda out, sizes, env: out / "data")
    monkeypatch.setattr(bench, "search_subset", lambda data, k: data / "holdout-2k")
    monkeypatch.setattr(bench, "make_base", lambda *a, **k: "assets/fmnist-ddpm")
    monkeypatch.setattr(bench, "precompute_reference", lambda *a: None)
    monkeypatch.setattr(bench.results, "write", lambda out, dest: tmp_path / "RESULTS.md")
    monkeypatch.setattr(bench.subprocess, "call", lambda *a, **k: 1)      # the study, were it started, fails
    passes = []
    monkeypatch.setattr(bench, "run_chains", lambda chains, *a: passes.append(bench.chain_order(chains)))
    for name in ("deme", "deme-seed1", "n1-all-timesteps", "n1-all-timesteps-seed1", "deme-lora",
                 "deme-lora-seed1"):       # the main rows' range models are trained (the 4x ones are not)
        (out / name / "ranges" / "0" / "final").mkdir(parents=True)
        (out / name / "ranges.json").write_text(json.dumps({"ranges": [[0, 1000]]}))
        (out / name / "ranges" / "0" / "final" / "deme.json").write_text("{}")
    argv = ["--suite", "keep-the-gain", "--scale", "cpu-5k", "--out", str(out)]

    assert bench.main(argv) == 1                              # no summary: objectives.py runs (and here fails)
    assert len(passes) == 1 and not any(job[0] in bench.CHOSEN for chain in passes[0] for job in chain)

    sets = ['merge.objective="fid"', "merge.search_num_images=1000", "merge.search_steps=50"]
    (out / "objectives").mkdir()
    (out / "objectives" / "objectives.json").write_text(json.dumps(
        {"seeds": [0, 1], "complete": True, "choice": "fid@1000", "objectives": {"fid@1000": {"sets": sets}}}))
    passes.clear()
    assert bench.main(argv) == 0
    assert len(passes) == 1
    order = [[(job[0], job[1]) for job in chain] for chain in passes[0]]
    assert order == [[("n1-all-timesteps", 0)], [("deme-lora", 0)], [("n1-all-timesteps", 1)], [("deme-lora", 1)],
                     [("deme", 0), ("deme-chosen", 0)], [("deme", 1), ("deme-chosen", 1)],
                     [("n1-all-timesteps-4x", 0)], [("n1-all-timesteps-4x", 1)],
                     [("deme-4x", 0), ("deme-4x-chosen", 0)], [("deme-4x", 1), ("deme-4x-chosen", 1)]]
    for chain in passes[0]:
        for name, seed, run_dir, cmd, *_ in chain:
            has = [s in cmd for s in sets]
            assert all(has) if name in bench.CHOSEN else not any(has), name
