"""End to end through the `deme` command line (in-process): train N = 2 ranges, merge, sample, eval."""
from __future__ import annotations

import json


def test_train_merge_sample_eval(make_recipe, tiny_images, tmp_path):
    import torch
    from typer.testing import CliRunner

    from deme_cli.cli import app
    from nets import tiny_feature_net
    from deme_cli.engine.runs import RunDir, read_json

    extractor = tmp_path / "tiny-features.pt"
    torch.jit.script(tiny_feature_net(dim=8)).save(str(extractor))    # the real TorchScript code path, tiny net
    recipe = make_recipe(train={"steps": 2, "batch_size": 4, "checkpoint_every": 2},
                         merge={"weights": [0.5, 0.5]},
                         sample={"scheduler": "ddim", "steps": 4, "num_images": 16, "batch_size": 8, "seed": 3},
                         eval={"reference": str(tiny_images), "metrics": ["fid", "kid"],
                               "feature_extractor": str(extractor), "batch_size": 16})
    path = tmp_path / "recipe.toml"
    path.write_text(recipe.to_toml())
    run = RunDir(recipe.out_dir)
    cli = CliRunner()

    def deme(*args):
        res = cli.invoke(app, [args[0], str(path), *args[1:]])
        assert res.exit_code == 0, f"deme {' '.join(args)}: {res.output}"
        return res

    deme("train", "--all")
    deme("merge")
    assert (run.merged / "merge.json").is_file()
    for m in ("base", "merged", "ensemble"):
        out = json.loads(deme("sample", "--model", m, "--json").stdout)
        assert out["generated"] == 16 and len(list(run.samples(m).glob("0*.png"))) == 16
    assert read_json(run.samples("ensemble") / "samples.json")["model_info"]["calls_per_range"] == [4, 4]
    again = json.loads(deme("sample", "--model", "merged", "--json").stdout)
    assert (again["generated"], again["skipped"]) == (0, 16)

    res = json.loads(deme("eval", "--models", "base,merged,ensemble", "--json").stdout)["results"]
    assert set(res) == {"base", "merged", "ensemble"}
    for m, r in res.items():
        assert r["num_images"] == 16 and r["metrics"]["fid"] > 0 and r["metrics"]["kid"] is not None
        assert r["feature_extractor"]["path"] == str(extractor) and read_json(run.eval_json(m)) == r
    # the three models differ (merged != base: the finetuning moved the weights)
    assert len({round(r["metrics"]["fid"], 9) for r in res.values()}) == 3

    table = cli.invoke(app, ["eval", str(path), "--models", "base,merged,ensemble"])
    assert table.exit_code == 0 and "fid" in table.output and "ensemble" in table.output
    bad = cli.invoke(app, ["eval", str(path), "--set", f'eval.reference="{tmp_path / "nope"}"'])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    bad = cli.invoke(app, ["eval", str(path), "--models", "range:1"])
    assert bad.exit_code == 2 and "deme sample" in bad.output
