"""The per-run evaluation cache shared by the study's evaluators.

An evaluation is stored beside what it measured, in ``study_eval.json``, together with the inputs it
depended on (checkpoint identity, evaluation seed, prompts, sample counts). A re-run of a study reuses
it while those inputs are unchanged, so an interrupted study resumes without evaluating again."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict

EVAL_FILE = "study_eval.json"


def cached_evaluation(folder: Path, inputs: Dict[str, Any], measure) -> Dict[str, Any]:
    """``measure()``'s metrics, reused from ``folder/study_eval.json`` while it records the same
    ``inputs`` (what the evaluation depends on), else measured, timed and stored there."""
    path = folder / EVAL_FILE
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            if stored.get("inputs") == json.loads(json.dumps(inputs, default=str)):
                return dict(stored["metrics"])
        except (OSError, ValueError):
            pass
    started = time.time()
    metrics = measure()
    metrics["eval_seconds"] = round(time.time() - started, 3)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"inputs": inputs, "metrics": metrics}, indent=1, default=str))
    tmp.replace(path)
    return metrics
