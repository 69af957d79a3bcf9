"""benchmarks/fashion-mnist/results.py: the table is rebuilt from the run dirs, a hand-written notes block survives,
and a smoke run never writes the real RESULTS.md. benchmarks/results_md.py: JSON -> the GPU/CPU blocks of
benchmarks/RESULTS.md."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH / "fashion-mnist" / "results.py"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
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
