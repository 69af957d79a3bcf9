"""`deme report`: the run directory written up as one self-contained HTML file and a Markdown report
(engine: report.py, report_data.py, report_render.py). It reads the run and writes only <run>/report/."""
from __future__ import annotations

from ..engine.report import write_report
from ..engine.runs import RunDir


def run_report(recipe, run: RunDir, recipe_arg: str = "RECIPE") -> dict:
    """`deme report RECIPE`: {"html", "markdown", "step_summary", "missing"}. `recipe_arg` names the recipe in the
    commands the report suggests for what is missing; the recipe itself is shown when the run recorded none."""
    return write_report(run, recipe_arg, recipe.to_toml())
