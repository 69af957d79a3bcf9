"""What the commands print for a person (stderr, rich tables): one function per result. `--json` prints the result
itself instead."""
from __future__ import annotations

from typing import Optional

from .engine import ui

METRIC_NAMES = {"clip_score": "CLIP score", "loss_ratio": "loss / base", "kid_std": "KID std"}


def merge(result: dict) -> None:
    """`deme merge`: the weights per range, and the best candidates of a search."""
    extra = "".join(f", {k} {result[k]}" for k in ("density", "seed") if k in result)
    ui.table(f"{result['method']}{extra}{' (unchanged)' if result['skipped'] else ''} -> {result['merged']}",
             ["range", "timesteps", "weight", "model"],
             [[r["index"], f"[{r['lo']}, {r['hi']})" if r.get("lo") is not None else None, w, r["path"]]
              for r, w in zip(result["ranges"], result["weights"] or ["routed by t"] * len(result["ranges"]))])
    log = result.get("search")
    if log:
        top = sorted(log["candidates"], key=lambda c: c["score"])[:10]
        ui.info(f"search: {log['strategy']}, {log['evaluations']} merges scored by {log['objective']} (lower is "
                f"better) in {log['seconds']:.0f} s; the best is written")
        ui.table(f"best {len(top)} candidates", ["rank", "weights", log["objective"]],
                 [[k + 1, ", ".join(f"{x:g}" for x in c["weights"]), c["score"]] for k, c in enumerate(top)])


def evaluation(r: dict) -> None:
    """`deme eval`: one column per model (current numbers only), then the loss by timestep and what is stale."""
    res = r["results"]
    keys = list(dict.fromkeys(k for v in res.values() for k in v["metrics"]))
    rows = [[k] + [res[m]["metrics"].get(k) for m in res] for k in keys]
    rows.append(["images"] + [res[m].get("num_images") for m in res])
    if r.get("reference"):
        ui.info(f"reference: {r['reference']} (clean-fid, {r['mode']} mode)")
    ui.table("eval", ["metric"] + list(res), rows)
    loss_by_t(res, r.get("loss_plot"))
    stale(r.get("stale") or {})


def stale(by_model: dict) -> None:
    """Parts of eval results left out because their model or samples changed, with what refreshes them."""
    for m, parts in by_model.items():
        for part, v in parts.items():
            what = "loss by timestep" if part == "loss" else "sample scores"
            ui.info(f"{m}: {what} not shown, stale ({v['why']}): run {v['command']}")


def loss_by_t(results: dict, plot: Optional[str], bins: Optional[int] = None) -> None:
    """The held-out loss by timestep: per set of bins (loss_by_t.by_bins), the base's loss in each bin, then each
    model's ratio to it; rows are matched by their edges, models scored on other bins get their own table."""
    from .engine.loss_by_t import by_bins

    groups = by_bins({m: v["loss_by_t"] for m, v in results.items() if v.get("loss_by_t")}, bins)
    for k, (edges, group) in enumerate(groups):
        first = next(iter(group.values()))
        rows = [[f"[{lo}, {hi})", first["base_loss"][b]] + [c["ratio"][b] for c in group.values()]
                for b, (lo, hi) in enumerate(edges)]
        rows.append(["mean of ratios", None] + [c["ratio_mean"] for c in group.values()])
        apart = "" if k == 0 else ", scored on other bins: shown apart"
        ui.table(f"held-out loss by timestep ({first['num_images']} images{apart}): base loss, and each model / base",
                 ["t", "base loss"] + list(group), rows)
    if groups and plot:
        ui.info(f"plot: {plot}")


def take_away(t: Optional[dict]) -> None:
    """Which model to take away (engine/take_away.py): the verdict, then the table."""
    if t is None:
        return
    ui.table("which model to take away", t["header"], t["rows"])
    ui.info(f"verdict: {t['verdict']}")
    for n in t["notes"]:
        ui.info(f"  note: {n}")


def gradients(result: dict) -> None:
    """`deme analyze-gradients`: the similarity summary and the files written."""
    s = result["summary"]
    ui.table(f"gradient similarity over {s['bins']} timesteps -> {result['analysis']}", ["pairs", "count", "mean"],
             [["adjacent bins", s["bins"] - 1, s["adjacent_mean"]],
              ["more than T/2 apart", s["distant_pairs"], s["distant_mean"]],
              ["inside [0, T/4)", s["first_quarter_pairs"], s["first_quarter_mean"]],
              ["all", s["bins"] * (s["bins"] - 1) // 2, s["all_pairs_mean"]]])
    for name, f in result["files"].items():
        ui.info(f"{name}: {f}")


def report(r: dict) -> None:
    """`deme report`: the files written and what the run still lacks."""
    ui.info(f"report: {r['html']}")
    ui.info(f"        {r['markdown']}")
    for line in r["missing"]:
        ui.info(f"  not yet: {line}")
    if r.get("step_summary"):
        ui.info(f"step summary appended to {r['step_summary']}")


def pipeline(name: str, r: dict) -> None:
    """`deme run`: the results per model, the loss by timestep, the stages."""
    keys = list(dict.fromkeys(k for m in r["models"].values() for k in m["metrics"]))
    ui.table(f"DeMe results ({name}){' vs ' + r['reference'] if r.get('reference') else ''}",
             ["model"] + [METRIC_NAMES.get(k, k.upper()) for k in keys] + ["images"],
             [[m] + [v["metrics"].get(k) for k in keys] + [v["num_images"]] for m, v in r["models"].items()])
    loss_by_t(r["models"], r.get("loss_plot"))
    stale(r.get("stale") or {})
    take_away(r.get("take_away"))
    stage_times(r["stages"])
    if r.get("report"):
        ui.info(f"report: {r['report']['html']}")


def stage_times(stages: list[dict]) -> None:
    """`deme run`'s stage times: each stage's seconds in this run and its share, and for a stage whose earlier
    output was kept, the seconds of the run that did its work (run.json)."""
    total = sum(s["seconds"] for s in stages)
    rows = [[s["stage"], s["status"], s["seconds"], f"{100 * s['seconds'] / total:.0f}%" if total > 0 else None,
             s.get("work_seconds") if s["status"] == "kept" else None] for s in stages]
    ui.table(f"stage times: {total:.1f} s in all", ["stage", "status", "seconds", "share", "earlier work, s"],
             rows + [["total", None, round(total, 2), None, None]])
