"""Which model to take away (engine/take_away.py): the verdict from the scored models against the base, with the
spread the eval knows (KID's std over subsets), and the folder to ship; printed at the end of `deme run`."""
from __future__ import annotations

import pytest

from deme_cli.engine.take_away import summarize

REF = {"path": "/data/ref", "kind": "folder"}
EXT = {"name": "inception"}


def ev(model: str, fid=None, kid=None, kid_std=None, loss=None, n=1000, **kw) -> dict:
    metrics = {k: v for k, v in (("fid", fid), ("kid", kid), ("kid_std", kid_std), ("loss_ratio", loss))
               if v is not None}
    return {"model": model, "metrics": metrics, "num_images": n, "mode": "clean", "reference": REF,
            "feature_extractor": EXT, **kw}


BASE = ev("base", fid=20.25, kid=0.0100, kid_std=0.0004, loss=1.0)


def test_merged_beyond_the_spread_is_taken_away():
    t = summarize([BASE, ev("merged", fid=19.9, kid=0.0090, kid_std=0.0003, loss=0.99)], {"method": "task_arithmetic"},
                  "r.toml")
    assert t["verdict"] == ("take away merged/ (task_arithmetic): its KID is lower than the base's by more than the "
                            "spread")
    assert t["header"] == ["model", "FID (vs base)", "KID ± std (vs base)", "loss / base", "against the base", "folder"]
    assert t["rows"][1] == ["merged", "19.9 (-0.35)", "0.009 ± 0.0003 (-0.001)", "0.9900", "better beyond the spread",
                            "merged/ (task_arithmetic)"]
    assert t["rows"][0][:4] == ["base", "20.25", "0.01 ± 0.0004", "1.0000"]


@pytest.mark.parametrize("kid, verdict", [(0.0096, "within the spread"), (0.0094, "better beyond the spread"),
                                          (0.0106, "worse")])
def test_the_spread_is_both_kids_std(kid, verdict):
    """sqrt(0.0003² + 0.0004²) = 0.0005: a difference of 0.0004 is within it, 0.0006 beyond."""
    t = summarize([BASE, ev("merged", kid=kid, kid_std=0.0003)], {"method": "ties"})
    assert t["rows"][1][-2] == verdict
    beaten = verdict.startswith("better")
    assert t["verdict"].startswith("take away merged/") == beaten
    if not beaten:
        assert t["verdict"] == "the base: no finetuned model beat it beyond the spread"


def test_the_ensemble_and_the_routed_merge():
    ens = ev("ensemble", kid=0.0080, kid_std=0.0003)
    t = summarize([BASE, ens, ev("merged", kid=0.0099, kid_std=0.0003)], {"method": "task_arithmetic"}, "r.toml")
    assert "`deme merge r.toml --method routed --force` writes it as merged/" in t["verdict"]
    assert t["rows"][1][-1] == "none yet: `deme merge r.toml --method routed` writes it as merged/"
    t = summarize([BASE, ev("merged", kid=0.0080, kid_std=0.0003)], {"method": "routed"})
    assert t["verdict"].startswith("take away merged/ (routed: the ensemble as one model)")


def test_no_verdict_without_a_spread_or_the_base():
    t = summarize([BASE, ev("merged", fid=10.0, loss=0.5)], {"method": "task_arithmetic"})
    assert t["verdict"].startswith("no verdict: FID, the CLIP score and the loss ratio come with no spread")
    assert t["rows"][1][-2] == "no spread known"
    t = summarize([ev("merged", kid=0.001, kid_std=0.0001)], None, "r.toml")
    assert t["verdict"].startswith("no verdict: the base is not scored; run `deme sample r.toml --model base`")
    assert summarize([], None) is None


def test_models_scored_unlike_the_base_get_no_difference():
    t = summarize([BASE, ev("merged", fid=5.0, kid=0.001, kid_std=0.0001, n=50)], {"method": "task_arithmetic"})
    assert t["rows"][1][1] == "5" and t["rows"][1][-2] == "scored unlike the base"
    assert t["verdict"] == "no verdict: the finetuned models were scored unlike the base; score them alike"
    assert t["notes"] and "re-score both with one recipe" in t["notes"][0]


def test_deme_run_prints_the_table(capsys):
    from deme_cli import tables

    t = summarize([BASE, ev("merged", kid=0.0080, kid_std=0.0003)], {"method": "task_arithmetic"})
    capsys.readouterr()
    tables.take_away(t)
    err = capsys.readouterr().err
    assert "which model to take away" in err and "verdict: take away merged/" in err and "better" in err
