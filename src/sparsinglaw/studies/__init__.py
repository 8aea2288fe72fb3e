"""Studies: a plan (TOML) -> independent runs -> train, track, fit -> summary.json and report.html.

`load_plan(path)` validates a plan before any work; `run_study(plan, out, StudyOptions(...))` runs it
(resumable, skippable, shardable); `analyse(out)` refits and `write_report(out)` rebuilds the page.
"""

from sparsinglaw.studies.plan import Plan, RunSpec, expand, load_plan, select
from sparsinglaw.studies.runner import STOPPED_MESSAGE, StudyOptions, StudyResult, run_study

__all__ = ["STOPPED_MESSAGE", "Plan", "RunSpec", "StudyOptions", "StudyResult", "expand", "load_plan",
           "run_study", "select"]
