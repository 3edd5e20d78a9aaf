"""Kept so that ``python -m dpo_zoo.study_results SUMMARY.json [...] [docs/results.md]`` (the command
the README and the study configs give) still works: the code lives in :mod:`dpo_zoo.study.results`."""

import runpy

if __name__ == "__main__":
    runpy.run_module("dpo_zoo.study.results", run_name="__main__", alter_sys=True)
