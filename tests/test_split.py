"""Data-driven splits: snr (equal log-SNR span) and affinity (contiguous clustering of the gradient matrix by DP)."""
import itertools
import json

import numpy as np
import pytest

from conftest import hand_alphas_cumprod
from deme_cli.engine.errors import UsageError
from deme_cli.engine.ranges import affinity_split, contiguous_clusters, interval_scores, split


def planted(sizes, within=0.8, between=-0.3, noise=0.05, seed=0):
    """A block-structured similarity matrix: `within` inside each block, `between` across, symmetric noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    s = np.where(labels[:, None] == labels[None, :], within, between) + rng.normal(0, noise, (len(labels),) * 2)
    s = np.clip((s + s.T) / 2, -1, 1)
    np.fill_diagonal(s, 1.0)
    return s


def brute_force(S, n):
    W, B = interval_scores(S), len(S)
    best = max(((0, *c, B) for c in itertools.combinations(range(1, B), n - 1)),
               key=lambda cuts: sum(W[a, b] for a, b in zip(cuts, cuts[1:])))
    return list(best), sum(W[a, b] for a, b in zip(best, best[1:]))


def test_interval_scores_are_kmeans_on_directions():
    """sum over ranges of W = B - within-range scatter of the unit vectors, for a real cosine matrix."""
    rng = np.random.default_rng(3)
    u = rng.normal(size=(7, 5))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    W = interval_scores(u @ u.T)
    cuts = [0, 2, 7]
    scatter = sum(((u[a:b] - u[a:b].mean(0)) ** 2).sum() for a, b in zip(cuts, cuts[1:]))
    assert W[0, 2] + W[2, 7] == pytest.approx(7 - scatter)
    assert W[3, 4] == pytest.approx(1.0) and W[4, 3] == -np.inf


@pytest.mark.parametrize("sizes", [[3, 5, 4], [1, 6, 2, 3], [4, 4], [2, 2, 2, 2, 2], [10, 1]])
def test_planted_blocks_are_recovered_exactly(sizes):
    S = planted(sizes, seed=len(sizes))
    cuts, _ = contiguous_clusters(S, len(sizes))
    assert cuts == [0, *np.cumsum(sizes).tolist()]


def test_planted_blocks_map_to_timestep_boundaries():
    """The cuts at bins become range boundaries at the bins' edges (here explicit, uneven edges)."""
    S = planted([2, 3, 3])
    edges = [0, 40, 100, 200, 350, 500, 700, 850, 1000]
    ranges, info = affinity_split(1000, 3, matrix=S, edges=edges, source={"matrix_file": "m.npz"})
    assert [(r.lo, r.hi) for r in ranges] == [(0, 100), (100, 500), (500, 1000)]
    assert info["cuts_in_bins"] == [0, 2, 5, 8] and info["matrix_file"] == "m.npz" and info["bins"] == 8
    assert info["objective"] >= info["objective_uniform_bins"]
    assert all(m > 0.6 for m in info["mean_similarity_within"])


@pytest.mark.parametrize("seed", range(6))
def test_dp_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    B = int(rng.integers(3, 10))
    u = rng.normal(size=(B, 4)) + np.linspace(0, 2, B)[:, None] * rng.normal(size=4)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    for S in (u @ u.T, np.clip(rng.uniform(-1, 1, (B, B)), -1, 1)):   # a cosine matrix, and an arbitrary one
        S = (S + S.T) / 2
        np.fill_diagonal(S, 1)
        for n in range(1, B + 1):
            cuts, obj = contiguous_clusters(S, n)
            bf_cuts, bf_obj = brute_force(S, n)
            assert obj == pytest.approx(bf_obj, abs=1e-9)
            assert len(cuts) == n + 1 and cuts[0] == 0 and cuts[-1] == B and all(np.diff(cuts) > 0)


def test_affinity_bad_input():
    S = planted([2, 2])
    with pytest.raises(UsageError, match="analyze-gradients"):
        split("affinity", 1000, 2)
    with pytest.raises(UsageError, match="bins"):
        split("affinity", 1000, 5, matrix=S, edges=[0, 250, 500, 750, 1000])
    with pytest.raises(UsageError, match="T = 1000"):
        split("affinity", 1000, 2, matrix=S, edges=[0, 10, 20, 30, 40])




@pytest.mark.parametrize("n", [1, 2, 4, 8, 1000])
def test_snr_split_monotone_covering_and_balanced(n):
    abar = hand_alphas_cumprod()
    ranges, info = split("snr", 1000, n, alphas_cumprod=abar)
    bounds = [r.lo for r in ranges] + [ranges[-1].hi]
    assert bounds[0] == 0 and bounds[-1] == 1000 and len(ranges) == n and all(np.diff(bounds) > 0)
    lam = np.log(abar / (1 - abar))
    if n <= 8:   # each range's log-SNR span is the total / n, up to one timestep's log-SNR step at each end
        step = np.abs(np.diff(lam)).max()
        total = lam[0] - lam[-1]
        assert np.allclose(info["log_snr_span_per_range"], total / n, atol=2 * step)
        for i, b in enumerate(bounds[1:-1], start=1):   # b is the first t at or below level i
            level = lam[0] - i * total / n
            assert lam[b] <= level < lam[b - 1]
    if n == 4:   # log-SNR falls fast at small t: the first range is the shortest
        assert bounds == sorted(bounds) and ranges[0].hi - ranges[0].lo < ranges[-1].hi - ranges[-1].lo


def test_snr_split_needs_a_falling_schedule():
    with pytest.raises(UsageError):
        split("snr", 4, 2, alphas_cumprod=[0.9, 0.5, 0.6, 0.1])
    with pytest.raises(UsageError):
        split("snr", 4, 2)


# --- through `deme split`: ranges.json records the strategy and its evidence; train reads the same ranges -----------

def test_run_split_affinity_writes_evidence(make_recipe, tmp_path):
    from deme_cli.engine.gradients import save_matrix
    from deme_cli.engine.runs import RunDir
    from deme_cli.commands.split import run_split
    from deme_cli.engine.base import resolve_base
    from deme_cli.engine.splitting import load_ranges

    npz = tmp_path / "planted.npz"
    edges = (np.arange(11) * 100).tolist()
    save_matrix(npz, planted([3, 7]), np.array(edges[:-1]) + 50, edges, 1000, {"model_hash": "x", "params": "*"})
    recipe = make_recipe(ranges={"n": 2, "strategy": "affinity", "matrix": str(npz)})
    run = RunDir(recipe.out_dir)
    result = run_split(recipe, run)
    assert [(r["lo"], r["hi"]) for r in result["ranges"]] == [(0, 300), (300, 1000)]
    saved = json.loads(run.ranges_json.read_text())
    assert saved["strategy"] == "affinity" and saved["evidence"]["matrix_file"] == str(npz.resolve())
    assert saved["evidence"]["objective"] == pytest.approx(result["evidence"]["objective"])
    assert saved["evidence"]["bins"] == 10 and len(saved["evidence"]["matrix_sha256"]) == 16
    assert [(r.lo, r.hi) for r in load_ranges(resolve_base(recipe.model), recipe.ranges, run)] == [(0, 300), (300, 1000)]


def test_split_keeps_the_ranges_trained_models_were_trained_on(make_recipe, tmp_path):
    """Other ranges over a ranges.json whose ranges have models: refused (file untouched) unless --force; the same
    ranges, or other ranges before any training, are written."""
    from typer.testing import CliRunner

    from deme_cli.cli import app
    from deme_cli.engine.runs import RunDir

    recipe = make_recipe(ranges={"n": 2, "strategy": "uniform"})
    path = tmp_path / "recipe.toml"
    path.write_text(recipe.to_toml())
    run = RunDir(recipe.out_dir)

    def split_cli(*args):
        return CliRunner().invoke(app, ["split", str(path), *args])
    assert split_cli("--strategy", "snr").exit_code == 0                 # nothing trained: replaced freely
    assert json.loads(run.ranges_json.read_text())["strategy"] == "snr"
    assert split_cli().exit_code == 0
    uniform = run.ranges_json.read_text()
    (run.final(1) / "unet").mkdir(parents=True)                          # range 1 has a model now
    assert split_cli().exit_code == 0 and run.ranges_json.read_text() == uniform      # same ranges: fine
    r = split_cli("--strategy", "snr")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "holds other ranges, and range 1 was trained on them; re-run with --force" in " ".join(r.output.split())
    assert run.ranges_json.read_text() == uniform                         # untouched
    assert split_cli("--strategy", "snr", "--force").exit_code == 0
    assert json.loads(run.ranges_json.read_text())["strategy"] == "snr"


def test_run_split_affinity_without_matrix_is_usage_error(make_recipe):
    from deme_cli.engine.runs import RunDir
    from deme_cli.commands.split import run_split

    recipe = make_recipe(ranges={"n": 2, "strategy": "affinity"})
    with pytest.raises(UsageError, match="run `deme analyze-gradients` first or set ranges.matrix"):
        run_split(recipe, RunDir(recipe.out_dir))
    assert not RunDir(recipe.out_dir).ranges_json.exists()


def test_run_split_snr_uses_the_pipeline_schedule(make_recipe):
    from deme_cli.engine.runs import RunDir
    from deme_cli.commands.split import run_split

    recipe = make_recipe(ranges={"n": 4, "strategy": "snr"})
    result = run_split(recipe, RunDir(recipe.out_dir))
    from diffusers import DDPMScheduler

    abar = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double().numpy()   # what the fixture saved
    expected, _ = split("snr", 1000, 4, alphas_cumprod=abar)
    assert [(r["lo"], r["hi"]) for r in result["ranges"]] == [(r.lo, r.hi) for r in expected]
    assert result["strategy"] == "snr" and "rule" in result["evidence"]
