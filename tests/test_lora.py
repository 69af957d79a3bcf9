"""LoRA range models (deme.adapter = "lora"): what trains, what a range folder holds, and merges and samples of them
checked against peft's own merge of the adapters and against merging the equivalent full models."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import held_bytes, merge_inputs, tiny_recipe_dict, trainer_for
from deme_cli.commands import merge
from deme_cli.commands.train import run_train
from deme_cli.engine import adapters, models, pipeline_folders, search_pool, task_vectors
from deme_cli.engine.base import resolve_base
from deme_cli.engine.errors import UsageError
from deme_cli.engine.merge_methods import MERGE_METHODS, MergeSpec
from deme_cli.engine.model_specs import load_unets
from deme_cli.engine.ranges import Range
from deme_cli.engine.recipe import recipe_from_dict
from deme_cli.engine.runs import RunDir

LORA = {"adapter": "lora", "lora_rank": 4, "lora_alpha": 8.0}


def lora_recipe(tiny_ddpm, tiny_images, out, **deme):
    d = tiny_recipe_dict(tiny_ddpm, tiny_images, out)
    d["train"].update(lr=1e-2)              # large, so that 4 steps move B @ A visibly
    d["deme"].update({**LORA, **deme})
    return recipe_from_dict(d)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_ddpm, tiny_images):
    """A trained 2-range LoRA run (4 steps per range), shared read-only by the tests below."""
    recipe = lora_recipe(tiny_ddpm, tiny_images, tmp_path_factory.mktemp("lora") / "run")
    run = RunDir(recipe.out_dir)
    run_train(recipe, run)
    return recipe, run


def lora_file(folder):
    return pipeline_folders.folder_files(folder).lora


def projection_state(folder) -> dict:
    return load_file(str(pipeline_folders.folder_files(folder).projection))


def peft_merged(folder, base_folder, dtype=torch.float32) -> dict:
    """The UNet state of a LoRA range folder as peft computes it: the adapter injected into the base with peft's own
    loader, then every LoRA layer merged by peft (independent of adapters.delta)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    unet = models.load_unet(base_folder).to(dtype)
    a = models.read_meta(folder)["adapter"]
    inject_adapter_in_model(LoraConfig(r=a["rank"], lora_alpha=a["alpha"], target_modules=a["target_modules"]), unet)
    lora = {k.removeprefix("base_model.model."): v.to(dtype) for k, v in load_file(str(lora_file(folder))).items()}
    res = set_peft_model_state_dict(unet, lora)
    assert not res.unexpected_keys
    merged = 0
    for m in unet.modules():
        if isinstance(m, LoraLayer):
            m.merge()
            merged += 1
    assert merged > 0
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in unet.state_dict().items() if "lora_" not in k}


# --- training -----------------------------------------------------------------------------------------------------

def test_only_adapters_and_projections_train_and_the_base_stays_frozen(make_recipe, tiny_ddpm):
    recipe = make_recipe(deme=LORA, train={"lr": 1e-2})
    trainer = trainer_for(recipe, Range(0, 0, 500))
    names = {n for n, p in trainer.unwrapped().named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n or n.startswith("projections.") for n in names)
    assert any(".lora_A." in n for n in names) and any(n.startswith("projections.") for n in names)
    state0 = trainer.trainable_state()
    assert all(not v.any() for k, v in state0.items() if ".lora_B." in k)      # B = 0: the student starts as theta
    for _ in range(2):
        trainer.train_step()
    base = models.load_unet(tiny_ddpm).state_dict()
    unet = {k.replace(".base_layer", ""): v for k, v in trainer.unwrapped().unet.state_dict().items()
            if "lora_" not in k}
    assert unet.keys() == base.keys()
    assert all(torch.equal(unet[k], base[k]) for k in base)                    # every base tensor unchanged
    after = trainer.trainable_state()
    assert any(after[k].abs().max() > 0 for k in after if ".lora_B." in k)     # the adapters moved
    trainer.close()


def test_range_folder_holds_the_ema_adapters_and_projections_only(lora_run, tiny_ddpm):
    """final/ and final-raw/ hold the checkpoint's trained tensors (adapters, projections) and nothing trained else;
    the base UNet they sit on is a hard link to the base's files, so the folder adds a fraction of the base to disk."""
    recipe, run = lora_run
    base_files = [p for p in (tiny_ddpm / "unet").rglob("*") if p.is_file()]
    base_bytes = sum(p.stat().st_size for p in base_files)
    ck = run.checkpoints(0) / (run.checkpoints(0) / "latest").read_text().strip()
    for ema, ck_file in ((True, "ema.safetensors"), (False, "student.safetensors")):
        folder = run.final(0, ema=ema)
        assert adapters.is_lora_folder(folder)
        want = load_file(str(ck / ck_file))          # every trained tensor of the last checkpoint
        got = {**load_file(str(lora_file(folder))),
               **{"projections." + k: v for k, v in projection_state(folder).items()}}
        want = {(pipeline_folders.clean_lora_key(k[len("unet."):]) if k.startswith("unet.") else k): v
                for k, v in want.items()}
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
        meta = models.read_meta(folder)
        assert meta["adapter"] == {"kind": "lora", "rank": 4, "alpha": 8.0, "scale": 2.0,
                                   "target_modules": sorted(adapters.DEFAULT_TARGETS["UNet2DModel"])}
        assert meta["weights"] == ("ema" if ema else "raw")
        cfg = json.loads((folder / "unet" / "config.json").read_text())["deme"]["lora"]
        assert (cfg["ranks"], cfg["scales"]) == ([4], [2.0])
        own = [p for p in folder.rglob("*") if p.is_file() and not any(os.path.samefile(p, b) for b in base_files)]
        size = sum(p.stat().st_size for p in own)      # a copy of the base's UNet would count here
        assert size < base_bytes / 4, (size, base_bytes)


def test_resume_is_bit_exact_with_adapters(tiny_ddpm, tiny_images, tmp_path):
    def recipe(out, steps):
        r = lora_recipe(tiny_ddpm, tiny_images, tmp_path / out)
        return r.model_copy(update={"train": r.train.model_copy(update={"steps": steps})})
    run_train(recipe("one", 4), RunDir(tmp_path / "one"), 0)
    run_train(recipe("two", 2), RunDir(tmp_path / "two"), 0)
    run_train(recipe("two", 4), RunDir(tmp_path / "two"), 0)
    for ema in (True, False):
        a = load_file(str(lora_file(RunDir(tmp_path / "one").final(0, ema))))
        b = load_file(str(lora_file(RunDir(tmp_path / "two").final(0, ema))))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_changing_the_adapter_of_a_finished_range_is_refused(lora_run, tiny_ddpm, tiny_images, tmp_path):
    recipe, run = lora_run
    root = tmp_path / "copy"
    shutil.copytree(run.root, root)
    full = lora_recipe(tiny_ddpm, tiny_images, root, adapter="full")
    with pytest.raises(UsageError, match="deme.adapter"):
        run_train(full, RunDir(root), 0)


def test_lora_targets_that_match_nothing_are_refused_before_the_run_writes_anything(make_recipe):
    recipe = make_recipe(deme={**LORA, "lora_targets": ["nope"]})
    run = RunDir(recipe.out_dir)
    with pytest.raises(UsageError, match="match no Linear or Conv2d layer"):
        run_train(recipe, run)
    assert not run.root.exists() or not any(run.root.iterdir())


def test_lora_targets_that_match_nothing_are_refused(tiny_ddpm):
    unet = models.load_unet(tiny_ddpm)
    with pytest.raises(UsageError, match="'to_nothing' matches no Linear or Conv2d layer"):
        adapters.target_modules(unet, ["to_q", "to_nothing"])
    with pytest.raises(UsageError, match="match no Linear or Conv2d layer"):
        adapters.target_modules(unet, ["nope"])


# --- range models, sampling -----------------------------------------------------------------------------------------

def test_a_lora_range_model_loads_as_peft_merges_it(lora_run, tiny_ddpm):
    recipe, run = lora_run
    base = resolve_base(recipe.model, "cpu")
    for spec in ("range:0", "range:1", "ensemble"):
        model = load_unets(base, run, spec, "cpu", ranges=recipe.ranges, use_ema=True, resolution=16).denoiser.model
        for i in ([0, 1] if spec == "ensemble" else [int(spec[-1])]):
            want = peft_merged(run.final(i), tiny_ddpm)
            if spec == "ensemble":      # one base and two adapters: range model i is the base switched to i
                model.activate(i)
                got, projections = model.unet.state_dict(), model.projections[i]
            else:
                got, projections = model.unet.state_dict(), model.projections
            assert got.keys() == want.keys()
            assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-6
            proj = projection_state(run.final(i))
            assert all(torch.equal(projections.state_dict()[k], proj[k]) for k in proj)
    theta = models.load_unet(tiny_ddpm).state_dict()
    moved = peft_merged(run.final(1), tiny_ddpm)
    assert any(not torch.equal(moved[k], theta[k]) for k in theta)


def test_a_lora_range_folder_s_unet_is_the_range_model(lora_run, tiny_ddpm):
    """unet/ of a LoRA range folder (DemeUNet: base/ + the adapter, switched in exactly) computes what deme samples
    (the base with the deltas added), bit for bit; the base's own weights come back unchanged afterwards."""
    from deme_cli.engine.deme_unet import DemeUNet

    recipe, run = lora_run
    unet = DemeUNet.from_pretrained(run.final(1) / "unet")
    want = adapters.load_lora_model(run.final(1)).eval()
    x = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (100, 900):
            assert torch.equal(unet(x, torch.tensor(t)).sample, want(x, torch.tensor(t)).sample)
    theta = models.load_unet(tiny_ddpm).state_dict()
    assert all(torch.equal(unet.state_dict()[f"unet.{k}"], v) for k, v in theta.items())


def test_a_lora_range_model_needs_its_own_base(lora_run, tiny_ddpm, tmp_path):
    from safetensors.torch import save_file

    recipe, run = lora_run
    other = tmp_path / "other"
    shutil.copytree(tiny_ddpm, other)
    weights = other / "unet" / models.UNET_WEIGHTS
    state = load_file(str(weights))
    state["conv_in.bias"] = state["conv_in.bias"] + 1.0
    save_file(state, str(weights))
    with pytest.raises(UsageError, match="trained from another base model"):
        adapters.load_lora_model(run.final(0), other)
    with pytest.raises(UsageError, match="needs its base model"):
        adapters.load_lora_model(run.final(0), tmp_path / "gone")


# --- merging --------------------------------------------------------------------------------------------------------

def _merged(run):
    return models.split_state(models.folder_state(run.merged))


def test_task_arithmetic_of_lora_ranges_matches_a_hand_computation(lora_run, tiny_ddpm, tmp_path):
    recipe, run = lora_run
    root = tmp_path / "run"
    shutil.copytree(run.root, root)
    w = [0.3, 0.9]
    merge.run_merge(recipe.model_copy(update={"output": recipe.output.model_copy(update={"dir": str(root)})}),
                    RunDir(root), weights=w)
    unet, proj = _merged(RunDir(root))
    theta = {k: v.double() for k, v in models.load_unet(tiny_ddpm).state_dict().items()}
    ranges = [peft_merged(run.final(i), tiny_ddpm, torch.float64) for i in range(2)]
    assert unet.keys() == theta.keys()
    for k in theta:     # theta + sum_i w_i (theta_i - theta), theta_i = peft's merge of range i's adapters
        want = theta[k] + sum(wi * (r[k] - theta[k]) for wi, r in zip(w, ranges))
        assert torch.allclose(unet[k].double(), want, atol=1e-6, rtol=0), k
    eye = models.identity_projection_state(models.load_unet(tiny_ddpm))
    projs = [projection_state(run.final(i)) for i in range(2)]
    for k in eye:
        want = eye[k].double() + sum(wi * (p[k].double() - eye[k].double()) for wi, p in zip(w, projs))
        assert torch.allclose(proj[k].double(), want, atol=1e-7, rtol=0)
    assert sum(not torch.equal(unet[k], models.load_unet(tiny_ddpm).state_dict()[k]) for k in unet) > 0


def _full_copy(run, root, tiny_ddpm):
    """The same run with each LoRA range model written as a full float64 model folder (peft's merge in float64)."""
    for i in range(2):
        for ema in (True, False):
            src = run.final(i, ema)
            state = {"unet." + k: v for k, v in peft_merged(src, tiny_ddpm, torch.float64).items()}
            state.update({"projections." + k: v.double() for k, v in projection_state(src).items()})
            model = models.wrap(models.load_unet(tiny_ddpm).double(), True)
            meta = {k: v for k, v in models.read_meta(src).items() if k not in ("adapter", "base_model")}
            models.save_model_folder(RunDir(root).final(i, ema), model, meta, state=state, base_folder=tiny_ddpm)
    shutil.copy(run.ranges_json, RunDir(root).ranges_json)


@pytest.mark.parametrize("method", [m for m, v in MERGE_METHODS.items() if not v.routed])  # every task-vector method
def test_merging_lora_ranges_equals_merging_the_equivalent_full_models(lora_run, tiny_ddpm, tmp_path, method):
    recipe, run = lora_run
    lora_root, full_root = tmp_path / "lora", tmp_path / "full"
    shutil.copytree(run.root, lora_root)
    _full_copy(run, full_root, tiny_ddpm)
    w = [0.4, 0.7]
    outs = []
    for root in (lora_root, full_root):
        r = recipe.model_copy(update={"output": recipe.output.model_copy(update={"dir": str(root)}),
                                      "merge": recipe.merge.model_copy(update={"method": method, "density": 0.5,
                                                                               "seed": 3})})
        merge.run_merge(r, RunDir(root), weights=w)
        outs.append(_merged(RunDir(root)))
    (u_lora, p_lora), (u_full, p_full) = outs
    assert u_lora.keys() == u_full.keys() and p_lora.keys() == p_full.keys()
    bad = sum((~torch.isclose(u_lora[k].double(), u_full[k].double(), rtol=1e-5, atol=1e-7)).sum().item()
              for k in u_full)
    assert bad <= 2, bad       # TIES: an entry whose magnitude ties within float rounding may be trimmed differently
    assert all(torch.allclose(p_lora[k].double(), p_full[k], atol=1e-7) for k in p_full)
    theta = models.load_unet(tiny_ddpm).state_dict()
    assert any(not torch.equal(u_lora[k], theta[k]) for k in theta)


def test_candidate_merger_reads_lora_ranges_like_the_streamed_merge(lora_run):
    recipe, run = lora_run
    inputs = merge_inputs(recipe, run)
    spec = MergeSpec("task_arithmetic", 0.2, 0)
    merger = task_vectors.CandidateMerger(inputs, spec)
    model = task_vectors.new_candidate_model(inputs)
    # the search's memory estimate counts what the merger holds: theta and, per LoRA range, only the adapted layers
    full = 4 * sum(t.numel() for t in model.state_dict().values())
    assert search_pool.cache_bytes(inputs) == held_bytes(merger) < full * (1 + inputs.n)
    assert sum(len(taus) for group, _, _, taus in merger.entries if group == "unet") == \
        sum(len(r.lora_pairs) for r in inputs.ranges) > 0
    merger.load_into(model, [0.5, 1.0])
    got, want = model.state_dict(), task_vectors.merged_state(inputs, [0.5, 1.0], spec)
    assert all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7) for k in want)


# --- Stable Diffusion -----------------------------------------------------------------------------------------------

def test_stable_diffusion_lora_adapts_the_attention_only_and_merges(tiny_sd, tmp_path):
    from typer.testing import CliRunner

    from deme_cli.cli import app
    from test_sd_e2e import write_recipe

    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "sd.toml", tiny_sd, run, **{"deme.adapter": '"lora"', "deme.lora_rank": "2",
                                                                "train.lr": "1e-2"})
    for args in (["train", recipe, "--all"], ["merge", recipe]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
    meta = models.read_meta(RunDir(run).final(0))
    assert meta["adapter"]["target_modules"] == sorted(adapters.ATTENTION)
    theta = models.load_unet(tiny_sd["pipeline"]).state_dict()
    merged = models.split_state(models.folder_state(RunDir(run).merged))[0]
    changed = [k for k in theta if not torch.equal(merged[k], theta[k])]
    assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v") or ".to_out.0." in k for k in changed)
