"""Which model to take away: the scored models against the base, with the spread the eval knows, and the folder to ship.

One short table (the top of `deme report`, the end of `deme run`): per model, FID and KID with their difference to the
base's, KID's std over subsets, the CLIP score and the held-out loss / base, and the folder that holds it. Only
current numbers reach it (freshness.py), and a model is compared with the base only when both were scored alike (the
same reference, number of images, feature extractor and mode). A model beats the base when its KID is lower by more
than the spread, sqrt(std_model² + std_base²) of the two KIDs' std over subsets; FID, the CLIP score and the loss
ratio come with no spread, so alone they decide nothing. The folder to take away is merged/ (a merged or a routed model)
when it beats the base; the ensemble is one folder only once `deme merge --method routed` writes it as merged/; a range
model denoises only its own range and is never the answer.
"""
from __future__ import annotations

import math
from typing import Optional

from .runs import model_dirname

COMPARED_ALIKE = ("num_images", "mode")          # keys of two eval records that must match for a difference


def _alike(a: dict, b: dict) -> bool:
    ref = ((a.get("reference") or {}).get("path"), (b.get("reference") or {}).get("path"))
    ext = ((a.get("feature_extractor") or {}).get("name"), (b.get("feature_extractor") or {}).get("name"))
    return ref[0] == ref[1] and ext[0] == ext[1] and all(a.get(k) == b.get(k) for k in COMPARED_ALIKE)


def _folder(model: str, merge: Optional[dict], recipe_arg: str) -> str:
    if model == "base":
        return "the base (model.pretrained)"
    if model == "merged":
        return "merged/ (routed: the ensemble as one model)" if (merge or {}).get("method") == "routed" \
            else f"merged/ ({(merge or {}).get('method') or 'merged'})"
    if model == "ensemble":
        return f"none yet: `deme merge {recipe_arg} --method routed` writes it as merged/"
    return f"ranges/{model_dirname(model).split('-')[-1]}/final/ (its own range only)"


def kid_verdict(m: dict, base: dict) -> Optional[str]:
    """"better" / "worse" (KID lower / higher than the base's by more than the spread), "within the spread", or
    None when the spread is not known."""
    a, b = m.get("metrics") or {}, base.get("metrics") or {}
    if None in (a.get("kid"), a.get("kid_std"), b.get("kid"), b.get("kid_std")):
        return None
    spread, diff = math.hypot(a["kid_std"], b["kid_std"]), b["kid"] - a["kid"]
    return "better" if diff > spread else "worse" if -diff > spread else "within the spread"


def summarize(evals: list[dict], merge: Optional[dict], recipe_arg: str = "RECIPE") -> Optional[dict]:
    """{"header", "rows", "verdict", "notes"} of the current eval records `evals` (None when none holds a sample
    metric or a loss ratio)."""
    keep = [e for e in evals if any((e.get("metrics") or {}).get(k) is not None
                                    for k in ("fid", "kid", "clip_score", "loss_ratio"))]
    if not keep:
        return None
    base = next((e for e in keep if e["model"] == "base"), None)
    has = {k: any((e.get("metrics") or {}).get(k) is not None for e in keep)
           for k in ("fid", "kid", "clip_score", "loss_ratio")}
    header = ["model"] + (["FID (vs base)"] if has["fid"] else []) + (["KID ± std (vs base)"] if has["kid"] else []) \
        + (["CLIP score"] if has["clip_score"] else []) + (["loss / base"] if has["loss_ratio"] else []) \
        + ["against the base", "folder"]
    rows, notes, verdicts = [], [], {}
    for e in keep:
        m, alike = e.get("metrics") or {}, base is not None and e is not base and _alike(e, base)
        bm = (base or {}).get("metrics") or {}

        def delta(k: str) -> str:
            return f" ({m[k] - bm[k]:+.4g})" if alike and bm.get(k) is not None else ""

        row = [e["model"]]
        if has["fid"]:
            row.append(f"{m['fid']:.4g}{delta('fid')}" if m.get("fid") is not None else "-")
        if has["kid"]:
            std = f" ± {m['kid_std']:.4g}" if m.get("kid_std") is not None else ""
            row.append(f"{m['kid']:.4g}{std}{delta('kid')}" if m.get("kid") is not None else "-")
        if has["clip_score"]:
            row.append(f"{m['clip_score']:.4g}" if m.get("clip_score") is not None else "-")
        if has["loss_ratio"]:
            ratio = 1.0 if e["model"] == "base" else m.get("loss_ratio")
            row.append(f"{ratio:.4f}" if ratio is not None else "-")
        if e["model"] == "base":
            verdict = "-"
        elif base is None:
            verdict = "base not scored"
        elif not alike and any(m.get(k) is not None for k in ("fid", "kid")):
            verdict = "scored unlike the base"
            notes.append(f"{e['model']} and the base were scored on other images, numbers of images or feature "
                         f"extractors: re-score both with one recipe")
        else:
            verdict = kid_verdict(e, base) or "no spread known"
        verdicts[e["model"]] = verdict
        shown = verdict if verdict != "better" else "better beyond the spread"
        rows.append(row + [shown, _folder(e["model"], merge, recipe_arg)])
    return {"header": header, "rows": rows, "notes": notes,
            "verdict": _choose(verdicts, merge, base is not None, recipe_arg)}


def _choose(verdicts: dict, merge: Optional[dict], base_scored: bool, recipe_arg: str) -> str:
    if not base_scored:
        return f"no verdict: the base is not scored; run `deme sample {recipe_arg} --model base` and " \
               f"`deme eval {recipe_arg} --models base` (the same images as the others)"
    if verdicts.get("merged") == "better":
        return (f"take away {_folder('merged', merge, recipe_arg)}: its KID is lower than the base's by more than the "
                f"spread")
    if verdicts.get("ensemble") == "better":
        return (f"the ensemble beats the base beyond the spread but has no folder yet: `deme merge {recipe_arg} "
                f"--method routed --force` writes it as merged/ (one model, the base's compute per step)")
    if not any(v in ("better", "worse", "within the spread") for v in verdicts.values()):
        if "scored unlike the base" in verdicts.values():
            return "no verdict: the finetuned models were scored unlike the base; score them alike"
        return "no verdict: FID, the CLIP score and the loss ratio come with no spread; add \"kid\" to eval.metrics " \
               "(KID's std over subsets is the spread)"
    return "the base: no finetuned model beat it beyond the spread"
