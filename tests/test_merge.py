"""Merging range models: exact identities, hand-computed merges, TIES/DARE invariants, streaming, search, bad input."""
import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import hand_alphas_cumprod, held_bytes, merge_inputs, search_setup
from deme_cli.commands import merge
from deme_cli.engine.merge_methods import MERGE_METHODS
from deme_cli.engine import (merge_methods, models, pipeline_folders, search_objectives, search_pool, task_vectors,
                              weight_search)
from deme_cli.engine import merge_inputs as inputs_module
from deme_cli.engine.errors import UsageError
from deme_cli.engine.runs import RunDir
from deme_cli.engine.safetensors_stream import TensorFileReader, TensorFileWriter

N = 3
TASK_METHODS = [m for m, v in MERGE_METHODS.items() if not v.routed]    # "routed" combines no task vectors


def _spec(method: str, **settings) -> merge_methods.MergeSpec:
    """The merge spec of a [merge] section with this method (and density, seed): the recipe's defaults otherwise."""
    from deme_cli.engine.recipe import MergeSection

    return merge_methods.MergeSpec.from_section(MergeSection(method=method, **settings))


def _perturbed(base_unet, seed: int, scale: float, projection: bool):
    """A range model: theta plus Gaussian noise, with projections = identity plus noise."""
    gen = torch.Generator().manual_seed(seed)
    model = models.wrap(copy.deepcopy(base_unet), projection)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def write_ranges(root, pipe, n=N, projection=(True,) * N, scale=0.02, base_hash=None, seed=100):
    """Range model folders ranges/<i>/final (EMA) and final-raw for a run at `root`, as `train` writes them."""
    base = models.load_unet(pipe)
    h = base_hash or models.unet_hash(base)
    run = RunDir(root)
    for i in range(n):
        for ema in (True, False):
            m = _perturbed(base, seed + 10 * i + ema, scale, projection[i])
            meta = {"range": {"index": i, "lo": 1000 * i // n, "hi": 1000 * (i + 1) // n}, "base_hash": h,
                    "recipe": "tiny", "weights": "ema" if ema else "raw"}
            models.save_model_folder(run.final(i, ema=ema), m, meta, base_folder=pipe)
    return run


@pytest.fixture(scope="module")
def ranges_dir(tmp_path_factory, tiny_ddpm):
    root = tmp_path_factory.mktemp("ranges") / "run"
    write_ranges(root, tiny_ddpm)
    return root


@pytest.fixture
def setup(make_recipe, ranges_dir, tmp_path, heldout_images):
    """(recipe, run) with the module's range models copied into a fresh run dir; make(**sections) for variants.
    Searches default to the loss objective on the held-out images."""
    root = tmp_path / "run"
    shutil.copytree(ranges_dir, root)

    def make(**sections):
        merge_sec = {"objective": "loss", "search_reference": str(heldout_images), **sections.pop("merge", {})}
        return make_recipe(ranges={"n": N}, merge=merge_sec, **sections), RunDir(root)
    return make


def _state(folder):
    return models.load_model_folder(folder).state_dict()


def _base_state(pipe, with_proj=True):
    return models.wrap(models.load_unet(pipe), with_proj).state_dict()


# --- exact identities ---------------------------------------------------------------------------------------------

def test_zero_weights_give_theta_exactly(setup, tiny_ddpm):
    recipe, run = setup()
    res = merge.run_merge(recipe, run, weights=[0.0] * N)
    assert not res["skipped"] and res["projection"]
    got, want = _state(run.merged), _base_state(tiny_ddpm)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k  # projections come back as the identity
    assert any(k.startswith("projections.") for k in want)


@pytest.mark.parametrize("method", TASK_METHODS)   # every registered task-vector method
def test_one_hot_weight_gives_that_range_exactly(setup, method):
    recipe, run = setup(merge={"method": method, "density": 1.0})
    inputs = merge_inputs(recipe, run)
    for i in range(N):
        w = [0.0] * N
        w[i] = 1.0
        got = task_vectors.merged_state(inputs, w, merge_methods.MergeSpec.from_section(recipe.merge))
        want = _state(run.final(i))
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (i, k)


def test_hand_computed_merge_matches(setup, tiny_ddpm):
    recipe, run = setup()
    w = [0.1, -0.35, 0.8]
    merge.run_merge(recipe, run, weights=w)
    got = _hand_file_state(run.merged)                 # the files as written, read with safetensors only
    want = _hand_merge(tiny_ddpm, [run.final(i) for i in range(N)], w)
    theta = _base_state(tiny_ddpm)
    assert got.keys() == want.keys() == theta.keys()
    for k, t in theta.items():
        assert torch.allclose(got[k].double(), want[k], rtol=0, atol=1e-6), k
        assert not torch.equal(got[k], t), k  # every tensor moved, projections included
    assert torch.equal(models.load_model_folder(run.merged).state_dict()["unet.conv_in.weight"],
                       got["unet.conv_in.weight"])
    info = json.loads((run.merged / "merge.json").read_text())
    assert info["weights"] == w and info["method"] == "task_arithmetic" and len(info["ranges"]) == N
    assert {r["base_hash"] for r in info["ranges"]} == {info["base"]["base_hash"]}


def test_raw_weights_and_mixed_projections(make_recipe, tmp_path, tiny_ddpm):
    """use_ema = false reads final-raw/; a range without projections counts as identity projections (tau = 0)."""
    root = tmp_path / "run"
    write_ranges(root, tiny_ddpm, n=2, projection=(False, True))
    recipe = make_recipe(ranges={"n": 2}, merge={"use_ema": False})
    run = RunDir(root)
    merge.run_merge(recipe, run, weights=[0.5, 0.25])
    got = _state(run.merged)
    theta = _base_state(tiny_ddpm)
    r0 = _state(run.final(0, ema=False))
    r1 = _state(run.final(1, ema=False))
    for k, t in theta.items():
        tau0 = r0[k].double() - t.double() if k in r0 else 0.0
        want = t.double() + 0.5 * tau0 + 0.25 * (r1[k].double() - t.double())
        assert torch.allclose(got[k].double(), want, atol=1e-6), k


# --- TIES ---------------------------------------------------------------------------------------------------------

def test_ties_trim_keeps_density_fraction_by_magnitude():
    tau = torch.randn(1000, dtype=torch.float64)
    for density in (0.05, 0.2, 0.5):
        kept = merge_methods.sparsify(_spec("ties", density=density), "x", 0, tau.clone())
        mask = kept != 0
        assert mask.sum().item() == round(density * 1000)
        assert kept[mask].abs().min() >= tau[~mask].abs().max()  # the largest magnitudes are the ones kept
        assert torch.equal(kept[mask], tau[mask])
    assert (merge_methods.sparsify(_spec("ties", density=0.01), "x", 0, torch.randn(3, dtype=torch.float64)) != 0
            ).sum() == 1  # at least one


def test_ties_elects_sign_and_averages_agreeing_entries():
    gen = torch.Generator().manual_seed(0)
    taus = [torch.randn(500, generator=gen, dtype=torch.float64) for _ in range(4)]
    w = [0.5, 1.0, 0.2, 0.7]
    spec = _spec("ties", density=0.3)
    out = merge_methods.combine(spec, "x", lambda: [(i, wi, t.clone()) for i, (wi, t) in enumerate(zip(w, taus))])
    trimmed = torch.stack([wi * merge_methods.sparsify(spec, "x", i, t.clone())
                           for i, (wi, t) in enumerate(zip(w, taus))])
    elected = torch.sign(trimmed.sum(0))
    nz = out != 0
    assert nz.any()
    assert torch.equal(torch.sign(out[nz]), elected[nz])  # every output entry has the elected sign
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    want = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    assert torch.allclose(out, want)
    # an entry where two ranges disagree takes the mean of the winners only
    a = torch.tensor([3.0, -1.0], dtype=torch.float64)
    b = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    c = torch.tensor([2.0, 5.0], dtype=torch.float64)
    out = merge_methods.combine(_spec("ties", density=1.0), "y", lambda: [(0, 1.0, a.clone()), (1, 1.0, b.clone()),
                                                                          (2, 1.0, c.clone())])
    assert torch.equal(out, torch.tensor([2.5, 5.0], dtype=torch.float64))


def test_ties_one_range_density_one_is_task_arithmetic(setup):
    recipe, run = setup()
    inputs = merge_inputs(recipe, run)
    w = [0.0, 0.7, 0.0]
    ta = task_vectors.merged_state(inputs, w, _spec("task_arithmetic"))
    ties = task_vectors.merged_state(inputs, w, _spec("ties", density=1.0))
    assert all(torch.equal(ta[k], ties[k]) for k in ta)
    tau = torch.randn(50, dtype=torch.float64)
    assert torch.equal(merge_methods.combine(_spec("ties", density=1.0), "z", lambda: [(0, 0.3, tau.clone())]), tau * 0.3)


# --- DARE ---------------------------------------------------------------------------------------------------------

def test_dare_preserves_expectation_and_keeps_density():
    gen = torch.Generator().manual_seed(1)
    tau = torch.randn(2000, generator=gen, dtype=torch.float64)
    density, seeds = 0.3, 400
    outs = torch.stack([merge_methods.combine(_spec("dare", density=density, seed=s), "w",
                                              lambda: [(0, 1.0, tau.clone())])
                        for s in range(seeds)])
    kept = (outs != 0).double().mean().item()
    assert abs(kept - density) < 0.01
    assert torch.allclose(outs[outs != 0] / tau.expand_as(outs)[outs != 0],
                          torch.full((int((outs != 0).sum()),), 1 / density, dtype=torch.float64))
    mean = outs.mean(0)
    # per entry: sd of the mean = |tau| sqrt((1 - p) / p) / sqrt(seeds) ~ 0.076 |tau|
    assert ((mean - tau).abs() / tau.abs()).median() < 0.08
    assert abs((mean - tau).mean().item()) < 0.01


def test_dare_density_one_is_task_arithmetic_and_seeded(setup):
    recipe, run = setup()
    inputs = merge_inputs(recipe, run)
    w = [0.3, 0.5, 0.2]
    ta = task_vectors.merged_state(inputs, w, _spec("task_arithmetic"))
    d1 = task_vectors.merged_state(inputs, w, _spec("dare", density=1.0, seed=5))
    assert all(torch.equal(ta[k], d1[k]) for k in ta)
    a = task_vectors.merged_state(inputs, w, _spec("dare", density=0.5, seed=5))
    b = task_vectors.merged_state(inputs, w, _spec("dare", density=0.5, seed=5))
    c = task_vectors.merged_state(inputs, w, _spec("dare", density=0.5, seed=6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # the drop of each tensor depends on its name only, not on the order tensors are streamed in
    inputs.entries = list(reversed(inputs.entries))
    r = task_vectors.merged_state(inputs, w, _spec("dare", density=0.5, seed=5))
    assert all(torch.equal(a[k], r[k]) for k in a)


# --- streaming ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", TASK_METHODS)   # every registered task-vector method
def test_streamed_folder_equals_in_memory_merge(setup, method):
    recipe, run = setup(merge={"method": method, "density": 0.5, "seed": 3})
    w = [0.1, 0.2, 0.5]
    merge.run_merge(recipe, run, weights=w)
    inputs = merge_inputs(recipe, run)
    mem = task_vectors.merged_state(inputs, w, merge_methods.MergeSpec.from_section(recipe.merge))
    disk = _hand_file_state(run.merged)
    assert disk.keys() == mem.keys()
    assert all(torch.equal(disk[k], mem[k]) for k in mem)
    # the folder loads back as a model, and computes what the in-memory merge computes
    loaded = models.load_model_folder(run.merged)
    cand = task_vectors.new_candidate_model(inputs)
    task_vectors.load_merged_into(cand, inputs, w, merge_methods.MergeSpec.from_section(recipe.merge))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, cand(x, t).sample)
    meta = json.loads((run.merged / "deme.json").read_text())
    assert meta["base_hash"] == inputs.base_hash and meta["weights"] == w


def _ties_by_stack(scaled: list):
    """TIES' consensus as a formula over the stacked scaled, trimmed task vectors (as deme computed it before it
    streamed them): elect sign(sum), mean of the agreeing entries."""
    stacked = torch.stack(scaled)
    elected = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == elected) & (elected != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def test_ties_streamed_consensus_equals_the_stacked_formula():
    """disjoint_mean reads the ranges twice, one task vector at a time, instead of stacking them: the same values
    (sums run over the ranges in order; torch's sum over a stack of 8 or more may add in another order, so float64
    rounding may differ by an ulp), for 1-8 ranges, entries that are exactly 0 and ties in sign."""
    gen = torch.Generator().manual_seed(0)
    zeros = 0
    for n in range(1, 9):
        for shape in [(7,), (64, 33), (32, 16, 3, 3)]:
            taus = [torch.randn(shape, generator=gen, dtype=torch.float64) * (torch.rand(shape, generator=gen) < 0.6)
                    for _ in range(n)]
            w = [float(x) for x in torch.randn(n, generator=gen)]
            got = merge_methods.disjoint_mean(lambda: zip(taus, w))
            want = _ties_by_stack([t * wi for t, wi in zip(taus, w)])
            torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-15)
            assert torch.equal(got == 0, want == 0)
            zeros += int((want == 0).sum())
    assert zeros > 100
    assert merge_methods.disjoint_mean(lambda: []) is None


@pytest.mark.parametrize("method", TASK_METHODS)
def test_merge_streams_theta_and_gives_the_merge_of_the_loaded_base(setup, tiny_ddpm, method, monkeypatch):
    """theta is read from the base's safetensors file tensor by tensor (the base UNet is never loaded), with the hash
    `train` computes on the loaded UNet; every merged tensor equals the merge with theta loaded whole (the way every
    merge ran before), and TIES equals its stacked formula by hand, every float32 bit."""
    recipe, run = setup(merge={"method": method, "density": 0.5, "seed": 3})
    spec, w = merge_methods.MergeSpec.from_section(recipe.merge), [0.1, -0.2, 0.5]
    streamed = merge_inputs(recipe, run)
    assert streamed.theta_files == [tiny_ddpm / "unet" / models.UNET_WEIGHTS]
    got = task_vectors.merged_state(streamed, w, spec)
    assert "base_unet" not in vars(streamed)       # cached_property: never loaded
    monkeypatch.setattr(inputs_module, "streamable_theta", lambda unet_dir, skeleton: [])
    loaded = merge_inputs(recipe, run)
    assert loaded.theta_files == [] and loaded.base_hash == streamed.base_hash == \
        models.unet_hash(models.load_unet(tiny_ddpm))
    assert loaded.entries == streamed.entries
    want = task_vectors.merged_state(loaded, w, spec)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    if method == "ties":
        theta = _base_state(tiny_ddpm)
        ranges = [_state(run.final(i)) for i in range(N)]
        for k, t in theta.items():
            scaled = [wi * merge_methods.sparsify(spec, k, i, r[k].double() - t.double())   # TIES: no seed
                      for i, (wi, r) in enumerate(zip(w, ranges))]
            assert torch.equal(got[k], (t.double() + _ties_by_stack(scaled)).to(t.dtype)), k


@pytest.mark.parametrize("method", TASK_METHODS)
def test_streamed_merge_file_equals_the_straightforward_formula(setup, tiny_ddpm, method):
    """What `deme merge` streams to disk equals, every tensor, the formula with every model in memory at once: theta
    and the N range models loaded whole (safetensors only), each tau_i = theta_i - theta sparsified as the method says
    (TIES trim, DARE's seeded drop and rescale), then the weighted sum (task arithmetic, DARE) or TIES' elected-sign
    mean over the stacked task vectors."""
    recipe, run = setup(merge={"method": method, "density": 0.5, "seed": 11})
    spec, w = merge_methods.MergeSpec.from_section(recipe.merge), [0.3, -0.2, 0.6]
    merge.run_merge(recipe, run, weights=w)
    got = _hand_file_state(run.merged)
    theta = _hand_merge(tiny_ddpm, [run.final(i) for i in range(N)], [0.0] * N)   # theta, identity projections
    ranges = [_hand_file_state(run.final(i)) for i in range(N)]
    assert got.keys() == theta.keys() and all(r.keys() == theta.keys() for r in ranges)
    moved = 0
    for k, t in theta.items():
        name = k if k.startswith("unet.") else "projection." + k[len("projections."):]   # merged_tensors names
        taus = [merge_methods.sparsify(spec, name, i, r[k].double() - t) for i, r in enumerate(ranges)]
        scaled = [wi * tau for wi, tau in zip(w, taus)]
        delta = _ties_by_stack(scaled) if method == "ties" else sum(scaled)
        want = (t + delta).to(got[k].dtype)
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-7, msg=k)
        moved += int(not torch.equal(got[k], t.to(got[k].dtype)))
    assert moved == len(theta)          # every tensor moved, projections included


@pytest.mark.parametrize("method", ["ties", "routed"])
def test_merged_folder_is_written_without_loading_theta(setup, tiny_ddpm, method, monkeypatch):
    """`deme merge` writes merged/ (a weighted merge or the routed model) with theta's UNet class and config read from
    its config.json, never loading the base UNet; the folder's config is the base's, every entry."""
    from deme_cli.engine import base as base_module

    def no_load(*args, **kwargs):
        raise AssertionError("the base UNet was loaded")

    monkeypatch.setattr(base_module.Base, "load_unet", no_load)
    monkeypatch.setattr(models, "load_unet", no_load)
    recipe, run = setup(merge={"method": method})
    merge.run_merge(recipe, run, weights=[0.2, 0.3, 0.5])
    base_cfg = json.loads((tiny_ddpm / "unet" / "config.json").read_text())
    got = json.loads((run.merged / "unet" / "config.json").read_text())
    if got["_class_name"] == "DemeUNet":
        assert got["unet_class"] == base_cfg["_class_name"]
    else:
        assert got["_class_name"] == base_cfg["_class_name"]
    stock = {k: v for k, v in base_cfg.items() if not k.startswith("_")}
    assert {k: got[k] for k in stock} == stock


def test_theta_is_loaded_whole_when_its_file_is_not_what_diffusers_loads(tiny_ddpm, tmp_path):
    """streamable_theta: only a safetensors file holding exactly the loaded UNet's names, dtypes and shapes is read
    tensor by tensor; an fp16 file (diffusers loads it as float32), a renamed tensor or a .bin file are not."""
    from safetensors.torch import save_file

    unet_dir = tiny_ddpm / "unet"
    skeleton = models.empty_unet(unet_dir)
    assert inputs_module.streamable_theta(unet_dir, skeleton) == [unet_dir / models.UNET_WEIGHTS]
    state = load_file(str(unet_dir / models.UNET_WEIGHTS))
    for name, variant in [("fp16", {k: v.half() for k, v in state.items()}),
                          ("renamed", {("x" + k if i == 0 else k): v for i, (k, v) in enumerate(state.items())})]:
        d = tmp_path / name
        d.mkdir()
        save_file(variant, str(d / models.UNET_WEIGHTS))
        assert inputs_module.streamable_theta(d, skeleton) == [], name
    assert inputs_module.streamable_theta(tmp_path, skeleton) == []     # no safetensors file at all


def test_tensor_file_writer_roundtrip(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).bfloat16(),
               "d": torch.zeros(0, 4), "e": torch.tensor(1.5, dtype=torch.float16)}
    from deme_cli.engine.safetensors_stream import dtype_name
    entries = [(k, dtype_name(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
    with TensorFileWriter(tmp_path / "x.safetensors", entries) as wr:
        for k, v in tensors.items():
            wr.write(k, v)
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    with TensorFileReader([tmp_path / "x.safetensors"]) as rd:
        assert all(torch.equal(rd.get(k), v) for k, v in tensors.items())
    with pytest.raises(ValueError):
        with TensorFileWriter(tmp_path / "y.safetensors", entries) as wr:
            wr.write("b", tensors["b"])  # out of the announced order


# --- re-running ---------------------------------------------------------------------------------------------------

def test_rerun_skips_same_settings_refuses_other_ones_and_replaces_with_force(setup):
    recipe, run = setup()
    first = merge.run_merge(recipe, run, weights=[0.2, 0.2, 0.2])
    assert not first["skipped"]
    again = merge.run_merge(recipe, run, weights=[0.2, 0.2, 0.2])
    assert again["skipped"] and again["fingerprint"] == first["fingerprint"]
    assert not merge.run_merge(recipe, run, weights=[0.2, 0.2, 0.2], force=True)["skipped"]
    with pytest.raises(UsageError, match=r"merge\.weights: \[0\.2, 0\.2, 0\.2\] -> \[0\.2, 0\.3, 0\.2\]"):
        merge.run_merge(recipe, run, weights=[0.2, 0.3, 0.2])
    assert json.loads((run.merged / "merge.json").read_text())["weights"] == [0.2, 0.2, 0.2]   # kept
    changed = merge.run_merge(recipe, run, weights=[0.2, 0.3, 0.2], force=True)
    assert not changed["skipped"]
    assert json.loads((run.merged / "merge.json").read_text())["weights"] == [0.2, 0.3, 0.2]
    assert not list(run.root.glob(".merged*"))  # no temporary folders left behind
    default = merge.run_merge(recipe, run, force=True)
    assert default["weights"] == pytest.approx([1 / N] * N)


# --- bad input ----------------------------------------------------------------------------------------------------

def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_bad_inputs_refused_and_merged_kept(setup, tiny_ddpm, tmp_path):
    recipe, run = setup()
    merge.run_merge(recipe, run, weights=[0.1, 0.1, 0.1])
    before = _snapshot(run.merged)

    with pytest.raises(UsageError, match="3 ranges"):
        merge.run_merge(recipe, run, weights=[0.1, 0.2])
    with pytest.raises(UsageError, match="comma-separated"):
        task_vectors.parse_weights("0.1,abc")
    assert task_vectors.parse_weights("0.1, 0.1,0.2,0.5") == [0.1, 0.1, 0.2, 0.5]

    # a range finetuned from another base
    meta_path = run.final(1) / "deme.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "base_hash": "0" * 16}))
    with pytest.raises(UsageError, match="different base models"):
        merge.run_merge(recipe, run, weights=[0.1, 0.1, 0.1], force=True)
    # all ranges from a base other than model.pretrained
    for i in range(N):
        p = run.final(i) / "deme.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), "base_hash": "0" * 16}))
    with pytest.raises(UsageError, match="different base model"):
        merge.run_merge(recipe, run, weights=[0.1, 0.1, 0.1], force=True)
    meta_path.write_text(json.dumps(meta))
    for i in (0, 2):
        p = run.final(i) / "deme.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), "base_hash": meta["base_hash"]}))

    # a missing range model names the range and the command to run
    shutil.rmtree(run.final(2))
    with pytest.raises(UsageError, match=r"range model 2 not found.*use_ema = false.*deme train RECIPE --range 2"):
        merge.run_merge(recipe, run, weights=[0.1, 0.1, 0.1], force=True)
    assert _snapshot(run.merged) == before


def test_other_architecture_refused(make_recipe, tmp_path, tiny_ddpm):
    from conftest import build_ddpm

    other = build_ddpm(tmp_path / "other", block_out_channels=(16, 48))
    root = tmp_path / "run"
    write_ranges(root, other, n=2, base_hash=models.unet_hash(models.load_unet(tiny_ddpm)))
    recipe = make_recipe(ranges={"n": 2})
    with pytest.raises(UsageError, match="different UNet architecture|has shape"):
        merge.run_merge(recipe, RunDir(root))
    assert not RunDir(root).merged.exists()


def test_cli_merge_json_and_bad_weight_count(setup):
    from typer.testing import CliRunner

    from deme_cli.cli import app

    recipe, run = setup()
    path = run.root.parent / "recipe.toml"
    path.write_text(recipe.to_toml())
    runner = CliRunner()
    res = runner.invoke(app, ["merge", str(path), "--weights", "0.1,0.2"])
    assert res.exit_code == 2 and "3 ranges" in res.output and not run.merged.exists()
    res = runner.invoke(app, ["merge", str(path), "--weights", "0.1,0.2,0.3", "--method", "ties", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{"):])
    assert out["weights"] == [0.1, 0.2, 0.3] and out["method"] == "ties" and out["density"] == 0.2
    res = runner.invoke(app, ["merge", str(path), "--method", "slerp"])
    assert res.exit_code == 2 and "slerp" in res.output


# --- search -------------------------------------------------------------------------------------------------------

class PlantedObjective:
    """Squared distance of the candidate's weights to a planted merge: minimal exactly at TARGET."""

    TARGET = [0.5, 0.0, 1.0]
    device = torch.device("cpu")

    def __init__(self, recipe, run, inputs):
        want = task_vectors.merged_state(inputs, self.TARGET, merge_methods.MergeSpec.from_section(recipe.merge))
        self.want = {k: v.double() for k, v in want.items()}

    def __call__(self, model):
        sd = model.state_dict()
        return sum(((sd[k].double() - v) ** 2).sum().item() for k, v in self.want.items())

    def describe(self):
        return {"planted": self.TARGET}


@pytest.mark.parametrize("strategy", ["grid", "coordinate", "greedy"])
def test_search_finds_planted_optimum(setup, monkeypatch, strategy):
    monkeypatch.setitem(search_objectives.OBJECTIVES, "loss", PlantedObjective)
    recipe, run = setup(merge={"search": strategy, "candidates": [0.0, 0.5, 1.0]})
    res = merge.run_merge(recipe, run, search=True)
    log = res["search"]
    assert res["weights"] == PlantedObjective.TARGET == log["best"]["weights"]
    assert log["best"]["score"] == pytest.approx(0.0, abs=1e-9)
    assert log["strategy"] == strategy and log["evaluations"] == len(log["candidates"])
    seen = [tuple(c["weights"]) for c in log["candidates"]]
    assert len(seen) == len(set(seen))
    if strategy == "grid":
        assert len(seen) == 27  # every combination is logged
    else:
        assert len(seen) < 27
    assert min(c["score"] for c in log["candidates"]) == log["best"]["score"]
    on_disk = json.loads((run.merged / "merge.json").read_text())
    assert on_disk["search"]["candidates"] == log["candidates"]
    assert on_disk["weights"] == PlantedObjective.TARGET


def test_search_with_loss_objective(setup, tiny_ddpm, heldout_images):
    """The loss objective's value, per image and as the search logs it, equals the held-out loss computed by hand
    (_hand_heldout_loss) for theta and for single range models."""
    recipe, run = setup(merge={"search": "grid", "candidates": [0.0, 1.0], "search_num_images": 6, "seed": 3})
    res = merge.run_merge(recipe, run, search=True)
    log = res["search"]
    assert log["objective"] == "loss" and log["num_images"] == 6 and log["evaluations"] == 8
    scores = {tuple(c["weights"]): c["score"] for c in log["candidates"]}
    assert len(set(scores.values())) > 1
    assert log["best"]["score"] == min(scores.values())

    theta = models.load_unet(tiny_ddpm).eval()
    want, idx, t = _hand_heldout_loss(theta, heldout_images, 6, seed=3)
    assert idx == [0, 2, 4, 7, 9, 11] and t == [83, 250, 416, 583, 750, 916]
    assert scores[(0.0, 0.0, 0.0)] == pytest.approx(float(want.mean()), rel=1e-5)
    objective = search_objectives.LossObjective(search_setup(recipe), run, merge_inputs(recipe, run))
    assert objective.indices == idx and objective.held.t.tolist() == t
    assert objective.losses(theta).tolist() == pytest.approx(want.tolist(), rel=1e-5)
    for i, w in enumerate([(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]):
        model = models.load_model_folder(run.final(i)).eval()
        want_i = _hand_heldout_loss(model, heldout_images, 6, seed=3)[0]
        assert scores[w] == pytest.approx(float(want_i.mean()), rel=1e-5), w
        assert objective(model) == pytest.approx(float(want_i.mean()), rel=1e-5), w


def test_search_refuses_the_eval_reference_and_a_missing_reference(setup, tiny_images, heldout_images, capsys):
    """The search is tuned on held-out training images, never on the images eval reports on."""
    m = {"search": "grid", "candidates": [0.0, 1.0], "search_num_images": 6}
    recipe, run = setup(merge={**m, "search_reference": str(heldout_images)}, eval={"reference": str(heldout_images)})
    with pytest.raises(UsageError, match="merge.search_reference is eval.reference"):
        merge.run_merge(recipe, run, search=True)
    recipe, run = setup(merge={**m, "search_reference": None})
    with pytest.raises(UsageError, match="needs merge.search_reference"):
        merge.run_merge(recipe, run, search=True)
    assert not run.merged.exists()
    # the training images themselves are allowed, with a warning
    recipe, run = setup(merge={**m, "search_reference": str(tiny_images)})
    merge.run_merge(recipe, run, search=True)
    assert "the images the ranges were finetuned on" in " ".join(capsys.readouterr().err.split())


def test_search_with_range_loss_objective(setup, tiny_images):
    """range_loss = mean over ranges of (candidate's held-out loss in the range) / (theta's): theta scores exactly 1;
    a candidate's score equals the hand computation from the plain objective's per-image losses."""
    m = {"search": "grid", "candidates": [0.0, 1.0], "search_num_images": 6, "search_reference": str(tiny_images)}
    recipe, run = setup(merge={**m, "objective": "range_loss"})
    res = merge.run_merge(recipe, run, search=True)
    log = res["search"]
    assert log["objective"] == "range_loss" and log["evaluations"] == 8
    assert log["ranges"] == [[0, 333], [333, 666], [666, 1000]] and log["timesteps_per_range"] == [2, 2, 2]
    scores = {tuple(c["weights"]): c["score"] for c in log["candidates"]}
    assert scores[(0.0, 0.0, 0.0)] == 1.0 and len(set(scores.values())) > 1
    assert log["best"]["score"] == min(scores.values())

    # by hand: t_k = floor((k + 1/2) 1000 / 6) = 83, 250, 416, 583, 750, 916 -> two images per range
    plain, _ = setup(merge={**m, "objective": "loss"})
    inputs = merge_inputs(plain, run)
    with inputs.open():
        objective, merger, _ = search_pool.candidate_evaluator(search_setup(plain), run, inputs,
                                                               merge_methods.MergeSpec.from_section(plain.merge))
        model = task_vectors.new_candidate_model(inputs).eval()
        merger.load_into(model, [0.0, 0.0, 0.0])
        theta = objective.losses(model)
        merger.load_into(model, [1.0, 0.0, 1.0])
        cand = objective.losses(model)
        assert objective(model) == pytest.approx(float(cand.mean()), rel=1e-12)
    want = sum(float(cand[2 * r:2 * r + 2].mean() / theta[2 * r:2 * r + 2].mean()) for r in range(3)) / 3
    assert scores[(1.0, 0.0, 1.0)] == pytest.approx(want, rel=1e-9)
    assert want != pytest.approx(float(cand.mean() / theta.mean()), rel=1e-6)   # not the plain ratio

    few, _ = setup(merge={**m, "objective": "range_loss", "search_num_images": 2})   # t = 250, 750: range 1 empty
    with pytest.raises(UsageError, match="leaves range 1 without a search timestep; use at least 3 images"):
        merge.run_merge(few, run, search=True, force=True)


def test_search_with_kid_objective(setup, tiny_images, tmp_path):
    from nets import tiny_feature_net

    ext = tmp_path / "tiny_extractor.pt"
    torch.jit.script(tiny_feature_net()).save(str(ext))
    recipe, run = setup(merge={"search": "coordinate", "candidates": [0.0, 1.0], "objective": "kid",
                               "search_num_images": 4, "search_steps": 2, "search_reference": str(tiny_images)},
                        sample={"batch_size": 4}, eval={"feature_extractor": str(ext)})
    res = merge.run_merge(recipe, run, search=True, weights=[0.0, 0.0, 1.0])
    log = res["search"]
    # the search loop's bookkeeping; the KID/FID values themselves are checked against hand computations and
    # `deme eval` in test_search_objectives.py
    assert log["objective"] == "kid" and log["sampler"]["steps"] == 2 and log["reference"]["num_images"] == 32
    scores = [c["score"] for c in log["candidates"]]
    assert len(scores) == log["evaluations"] >= 4 and all(s == s and abs(s) < 1e6 for s in scores)
    assert log["best"]["score"] == min(scores) and res["weights"] == log["best"]["weights"]
    # no held-out reference: one clear sentence before anything is written
    recipe, run = setup(merge={"objective": "fid", "search_reference": None})
    with pytest.raises(UsageError, match="search_reference"):
        merge.run_merge(recipe, run, search=True)


@pytest.mark.parametrize("method", TASK_METHODS)   # every registered task-vector method
def test_candidate_merger_matches_streamed_merge(setup, method):
    """The search's in-memory merges equal the streamed float64 merge up to float32 rounding."""
    recipe, run = setup(merge={"method": method, "density": 0.5, "seed": 1})
    inputs = merge_inputs(recipe, run)
    spec = merge_methods.MergeSpec.from_section(recipe.merge)
    merger = task_vectors.CandidateMerger(inputs, spec)
    model = task_vectors.new_candidate_model(inputs)
    assert search_pool.cache_bytes(inputs) == held_bytes(merger) == \
        4 * sum(t.numel() for t in model.state_dict().values()) * (1 + N)
    for w in ([0.1, 0.2, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]):
        merger.load_into(model, w)
        got, want = model.state_dict(), task_vectors.merged_state(inputs, w, spec)
        close = sum((~torch.isclose(got[k], want[k], rtol=1e-5, atol=1e-7)).sum().item() for k in want)
        assert close <= 2, (w, close)  # TIES: an entry whose signed sum is ~0 may elect the other sign in float32
        if w == [0.0, 0.0, 0.0]:
            assert all(torch.equal(got[k], want[k]) for k in want)


def test_failure_while_writing_keeps_previous_merged(setup, monkeypatch):
    recipe, run = setup()
    merge.run_merge(recipe, run, weights=[0.1, 0.1, 0.1])
    before = _snapshot(run.merged)
    real = task_vectors.merged_tensors

    def broken(*a, **k):
        for n, item in enumerate(real(*a, **k)):
            if n == 20:
                raise RuntimeError("disk full")
            yield item
    monkeypatch.setattr(task_vectors, "merged_tensors", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        merge.run_merge(recipe, run, weights=[0.3, 0.1, 0.1], force=True)
    assert _snapshot(run.merged) == before
    assert not list(run.root.glob(".merged*"))


def test_scaled_space_holds_theta_the_uniform_average_the_release_weights_and_a_sweep_of_the_sum():
    from deme_cli.engine.recipe import MergeSection, default_shapes

    space = weight_search.Space.from_recipe(MergeSection(), 4)
    cands = space.scaled()
    assert cands[0] == (0.0,) * 4
    assert (0.25,) * 4 in cands and (0.1, 0.1, 0.2, 0.5) in cands and (0.5, 0.2, 0.1, 0.1) in cands
    sums = sorted({round(sum(w), 9) for w in cands})
    assert sums == sorted({0.0} | {round(c * s, 9) for c in (0.5, 0.75, 1.0, 1.25, 1.5) for s in (1.0, 0.9)})
    assert len(cands) == len(set(cands)) == 1 + 3 * 5
    # other N: the uniform average, a rising ramp with the release's sum and last/first ratio, and its mirror
    shapes = default_shapes(3)
    assert shapes[0] == [1 / 3] * 3 and sum(shapes[1]) == pytest.approx(0.9)
    assert shapes[1][-1] / shapes[1][0] == pytest.approx(5.0) and shapes[2] == shapes[1][::-1]


def test_scaled_search_logs_every_candidate_and_draws_them(setup, monkeypatch):
    from PIL import Image

    monkeypatch.setitem(search_objectives.OBJECTIVES, "loss", PlantedObjective)
    recipe, run = setup(merge={"search": "scaled", "shapes": [[0.5, 0.0, 1.0], [1.0, 1.0, 1.0]],
                               "scales": [0.5, 1.0, 2.0]})
    res = merge.run_merge(recipe, run, search=True)
    log = res["search"]
    assert [c["weights"] for c in log["candidates"]] == [[0.0, 0.0, 0.0], [0.25, 0.0, 0.5], [0.5, 0.0, 1.0],
                                                         [1.0, 0.0, 2.0], [0.5, 0.5, 0.5], [1.0, 1.0, 1.0],
                                                         [2.0, 2.0, 2.0]]
    assert res["weights"] == PlantedObjective.TARGET and log["shapes"] == [[0.5, 0.0, 1.0], [1.0, 1.0, 1.0]]
    png = run.merged / "merge-search.png"
    assert png.is_file() and Image.open(png).size[0] >= 600


def test_sample_objectives_default_to_1000_images_and_the_eval_sampler(setup, monkeypatch, tmp_path):
    import numpy as np

    from deme_cli.engine import features, model_specs
    from nets import tiny_feature_net

    ext = tmp_path / "tiny_extractor.pt"
    torch.jit.script(tiny_feature_net()).save(str(ext))
    seen = []

    def fake_sample(model, base, sample, resolution, num_images, *, steps=None, **kw):
        seen.append((num_images, steps))
        return np.zeros((num_images, 16, 16, 3), np.uint8)

    def fake_features(images, *a, **kw):
        return np.random.default_rng(len(images) + len(seen)).normal(size=(len(images), 16))

    monkeypatch.setattr(model_specs, "sample_images", fake_sample)
    monkeypatch.setattr(features, "array_features", fake_features)
    recipe, run = setup(merge={"objective": "kid", "shapes": [[1.0, 0.0, 0.0]], "scales": [1.0]},
                        sample={"steps": 7}, eval={"feature_extractor": str(ext)})
    m = recipe.merge
    assert m.search == "scaled" and m.search_num_images == 1000 and m.search_steps is None
    log = merge.run_merge(recipe, run, search=True)["search"]
    assert seen == [(1000, 7), (1000, 7)]                       # theta and the one candidate
    assert log["num_images"] == 1000 and log["sampler"]["steps"] == 7


# --- by hand: the search's fallback merger and its loss objective ------------------------------------------------

def _hand_file_state(folder):
    """A model folder's weights read with safetensors only, keyed like DemeModel.state_dict(): a stock unet/
    (diffusion_pytorch_model.safetensors, one file or shards) or a DemeUNet's unet/model-0/ (unet.safetensors,
    projection.safetensors); no projection file: identity projections are filled in by _hand_merge."""
    own = folder / "unet" / "model-0"
    files = [own / "unet.safetensors"] if own.is_dir() else sorted((folder / "unet").glob("*.safetensors"))
    sd = {"unet." + k: v for f in files for k, v in load_file(str(f)).items()}
    if (own / "projection.safetensors").is_file():
        sd.update({"projections." + k: v for k, v in load_file(str(own / "projection.safetensors")).items()})
    return sd


def _hand_merge(pipe, folders, w):
    """theta + sum_i w_i (theta_i - theta), float64, every tensor; projections' theta (and a missing range
    projection) is the identity matrix."""
    theta = {"unet." + k: v.double() for k, v in load_file(str(pipe / "unet" / models.UNET_WEIGHTS)).items()}
    ranges = [_hand_file_state(f) for f in folders]
    proj_keys = sorted({k for r in ranges for k in r if k.startswith("projections.")})
    for k in proj_keys:
        c = next(r[k] for r in ranges if k in r).shape[0]
        theta[k] = torch.eye(c, dtype=torch.float64).view(c, c, 1, 1)
    return {k: t + sum(wi * (r[k].double() - t) if k in r else 0.0 for wi, r in zip(w, ranges))
            for k, t in theta.items()}


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory, tiny_ddpm):
    """Three range models, the middle one without projections (its projection task vector is 0)."""
    root = tmp_path_factory.mktemp("mixed") / "run"
    write_ranges(root, tiny_ddpm, projection=(True, False, True), seed=300)
    return root


@pytest.mark.parametrize("free", [1, 1 << 50], ids=["streaming-fallback", "in-memory"])
def test_search_mergers_load_the_hand_merge_into_the_candidate(make_recipe, mixed_dir, tiny_ddpm, monkeypatch,
                                                               capsys, free):
    """The weight search's candidate merges, on the fallback path (task vectors too big for memory: each candidate
    streamed from the files) and on the in-memory path, equal theta + sum_i w_i (theta_i - theta) computed here from
    the safetensors files, on every tensor, also when candidates follow each other in the same model."""
    monkeypatch.setattr(search_pool, "free_bytes", lambda device: free)
    recipe = make_recipe(ranges={"n": N})
    run = RunDir(mixed_dir)
    inputs = merge_inputs(recipe, run)
    merger = search_pool.make_merger(inputs, merge_methods.MergeSpec.from_section(recipe.merge), torch.device("cpu"))
    fallback = free == 1
    assert isinstance(merger, task_vectors.StreamingMerger if fallback else task_vectors.CandidateMerger)
    if not fallback:        # the estimate is what it holds: range 1 has no projections, so no projection taus
        assert search_pool.cache_bytes(inputs) == held_bytes(merger)
    assert ("merged from disk instead" in " ".join(capsys.readouterr().err.split())) == fallback
    model = task_vectors.new_candidate_model(inputs)
    folders = [run.final(i) for i in range(N)]
    for w in ([0.3, -0.6, 1.2], [0.0, 0.0, 0.0], [0.0, 0.9, 0.4], [1.0, 0.0, 0.0]):
        merger.load_into(model, w)
        got, want = model.state_dict(), _hand_merge(tiny_ddpm, folders, w)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.allclose(got[k].double(), want[k], rtol=0, atol=2e-6), (w, k)
    assert any(k.startswith("projections.") for k in want)


def test_search_fallback_scores_like_the_in_memory_search(setup, monkeypatch):
    """A whole search with the task vectors forced out of memory logs the streaming merger and the same scores."""
    monkeypatch.setitem(search_objectives.OBJECTIVES, "loss", PlantedObjective)
    recipe, run = setup(merge={"search": "scaled", "shapes": [[0.5, 0.0, 1.0], [1.0, 1.0, 1.0]], "scales": [0.5, 1.0]})
    fast = merge.run_merge(recipe, run, search=True)["search"]
    monkeypatch.setattr(search_pool, "free_bytes", lambda device: 1)
    slow = merge.run_merge(recipe, run, search=True, force=True)["search"]
    assert fast["merges"] == task_vectors.CandidateMerger.kind and slow["merges"] == task_vectors.StreamingMerger.kind
    assert [c["weights"] for c in slow["candidates"]] == [c["weights"] for c in fast["candidates"]]
    assert [c["score"] for c in slow["candidates"]] == pytest.approx([c["score"] for c in fast["candidates"]],
                                                                     rel=1e-5, abs=1e-9)
    assert slow["best"]["weights"] == PlantedObjective.TARGET


def _hand_heldout_loss(model, folder, n, seed, T=1000):
    """The loss objective by hand: n images evenly spaced through the sorted folder (index round(k (len-1)/(n-1))),
    noise torch.randn((n, 3, 16, 16)) seeded with merge.seed, t_k = floor((k + 1/2) T / n), x_t from alphas_cumprod
    of the linear DDPM betas, squared error of the prediction against the noise: per-image means."""
    import math

    import numpy as np
    from PIL import Image

    files = sorted(folder.glob("*.png"))
    idx = [round(k * (len(files) - 1) / (n - 1)) for k in range(n)]
    x0 = torch.from_numpy(np.stack([np.asarray(Image.open(files[i]).convert("RGB"), np.float32) / 127.5 - 1
                                    for i in idx]).transpose(0, 3, 1, 2).copy())
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    t = [math.floor((k + 0.5) * T / n) for k in range(n)]
    abar = hand_alphas_cumprod(T)
    a = torch.tensor([math.sqrt(abar[s]) for s in t]).view(-1, 1, 1, 1)
    b = torch.tensor([math.sqrt(1 - abar[s]) for s in t]).view(-1, 1, 1, 1)
    x_t = (a * x0.double() + b * noise.double()).float()
    with torch.no_grad():
        pred = model(x_t, torch.tensor(t)).sample
    return ((pred.double() - noise.double()) ** 2).flatten(1).mean(1), idx, t


def test_sharded_range_model_streams_into_the_hand_merge(setup, tiny_ddpm):
    """A range model saved as safetensors shards with an index (as diffusers saves big UNets) is streamed from all
    its shards: the merged folder equals the hand merge computed from the unsharded weights."""
    from safetensors.torch import save_file

    recipe, run = setup()
    folders = [run.final(i) for i in range(N)]
    w = [0.4, 0.7, -0.2]
    # range 1 as a stock diffusers UNet folder (no projections: their task vector is 0), then sharded
    unet_dir = run.final(1) / "unet"
    sd = load_file(str(unet_dir / "model-0" / "unet.safetensors"))
    cfg = {k: v for k, v in json.loads((unet_dir / "config.json").read_text()).items()
           if k not in ("deme", "unet_class")}
    shutil.rmtree(unet_dir)
    unet_dir.mkdir()
    (unet_dir / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DModel"}))
    single = unet_dir / models.UNET_WEIGHTS
    save_file(sd, str(single))
    want = _hand_merge(tiny_ddpm, folders, w)
    assert _hand_file_state(run.final(1)).keys() == {"unet." + k for k in sd}
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(unet_dir / name))
    (unet_dir / (models.UNET_WEIGHTS + ".index.json")).write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    single.unlink()
    assert pipeline_folders.unet_weight_files(unet_dir) == sorted(unet_dir / n for n in shards)
    merge.run_merge(recipe, run, weights=w)
    got = _hand_file_state(run.merged)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k].double(), want[k], rtol=0, atol=1e-6), k


# --- the candidate space: per-range strengths up to 1.5, with every merge method ---------------------------------

def test_default_candidates_reach_full_strength_and_beyond():
    from deme_cli.engine.recipe import MergeSection

    assert MergeSection().candidates == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]


class FullStrengthObjective(PlantedObjective):
    """Minimal exactly at a planted merge (TARGET, set per test)."""


# coordinate descent: range 0 off, range 1 at half strength, range 2 beyond full strength. Greedy keeps each range
# at its best solo weight or off, and TIES averages the agreeing ranges instead of summing them, so a range's solo
# optimum is not its optimum in company: greedy's planted merge is one range beyond full strength, the others off.
TARGETS = {"coordinate": [0.0, 0.5, 1.5], "greedy": [0.0, 0.0, 1.5]}


@pytest.mark.parametrize("method", TASK_METHODS)   # every method that combines task vectors (routed has no weights)
@pytest.mark.parametrize("strategy", ["coordinate", "greedy"])
def test_searches_reach_any_per_range_weight_with_every_method(setup, monkeypatch, strategy, method):
    """With the default candidates, coordinate descent (from 1/N each) and greedy find a planted merge that keeps a
    range off and another at 1.5, for task arithmetic, TIES and DARE alike (the objective is the distance to that
    merge made with the recipe's method); the log and merge-search.png hold every candidate scored."""
    from PIL import Image

    monkeypatch.setattr(FullStrengthObjective, "TARGET", TARGETS[strategy])
    monkeypatch.setitem(search_objectives.OBJECTIVES, "loss", FullStrengthObjective)
    recipe, run = setup(merge={"search": strategy, "method": method, "density": 0.5})
    res = merge.run_merge(recipe, run, search=True)
    log = res["search"]
    assert res["weights"] == TARGETS[strategy] == log["best"]["weights"], log["candidates"]
    assert log["method"] == method and log["candidate_values"] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert len(log["candidates"]) == log["evaluations"] == len({tuple(c["weights"]) for c in log["candidates"]})
    on_disk = json.loads((run.merged / "merge.json").read_text())["search"]
    assert on_disk["candidates"] == log["candidates"]
    assert Image.open(run.merged / "merge-search.png").size[0] >= 600


def test_search_plot_draws_every_candidate_and_its_weights():
    """The in-order search plot: one point per candidate at its score, and a column of weights per candidate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from deme_cli.engine import plots

    cands = [{"weights": [0.0, 0.0, 0.0], "score": 1.0}, {"weights": [0.25, 0.0, 1.5], "score": 0.8},
             {"weights": [1.0, 1.0, 0.0], "score": 1.3}, {"weights": [0.0, 0.5, 1.5], "score": 0.7}]
    log = {"strategy": "coordinate", "objective": "loss_by_t", "candidates": cands,
           "best": {"weights": [0.0, 0.5, 1.5], "score": 0.7}}
    fig = plots._in_order(plt, log)
    ax, heat = fig.axes[0], fig.axes[1]
    points = ax.lines[0]
    assert list(points.get_xdata()) == [1, 2, 3, 4] and list(points.get_ydata()) == [1.0, 0.8, 1.3, 0.7]
    assert np.array_equal(heat.images[0].get_array(), np.array([c["weights"] for c in cands]).T)
    plt.close(fig)
