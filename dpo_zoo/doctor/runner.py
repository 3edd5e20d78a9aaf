"""``dpo-zoo doctor RUN_OR_PREPARED_SET``: the health checks of :mod:`dpo_zoo.train.health` and
:mod:`dpo_zoo.cache.health` on a finished (or stopped) run, or on a prepared set.

    dpo-zoo doctor runs/demo/dpo                  # its logs, its training set, and samples from final/
    dpo-zoo doctor prepared/demo                  # both splits of a prepared set (or one split's folder)
    dpo-zoo doctor runs/demo/dpo --no-sample      # the logs and the prepared set only: no model loaded

For a run folder: the training-signal checks on ``logs.jsonl`` (with the run's own loss, batch and
step count from ``config.yaml`` / ``run.json``), the prepared-set checks on the set it trained on (when it
is still there), and — for a finished run, unless ``--no-sample`` — the sampled checks: one completion
for each of ``train.health.sample_prompts`` held-out prompts (spread through the set, at most
``train.health.sample_max_new_tokens`` tokens, temperature 1, seed ``train.seed``) from the trained
policy and from its base model, giving the length drift and the KL(π‖π_ref) per completion
(Rao–Blackwellized, :mod:`dpo_zoo.compare.drift`). Thresholds are ``train.health.*`` of the config given
with ``--config`` (defaults otherwise). Each finding is printed with its step and what to try; the
command exits with status 1 when there is one, 0 when there is none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from dpo_zoo.cache.format import MANIFEST
from dpo_zoo.cache.health import Finding
from dpo_zoo.errors import UserError
from dpo_zoo.train.health import Thresholds, kl_too_large, length_drift, series_findings
from dpo_zoo.train.run_folder import CONFIG_FILE, FINAL_DIR, LOGS_FILE, RUN_FILE


class DoctorError(UserError, ValueError):
    """A doctor target that is neither a run folder nor a prepared set."""


def read_logs(path: Path) -> List[Dict[str, Any]]:
    """The records of a ``logs.jsonl``; a malformed line is an error naming the file and line."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as err:
            raise DoctorError(f"{path}: line {number} is not JSON ({err})") from None
    return records


def last_run(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The records of the last run started in the folder (logs.jsonl is appended by every restart);
    a resumed run keeps the records of the steps before it."""
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    if not starts:
        return records
    first_step = int(records[starts[-1]].get("step", 0))
    kept = [r for r in records[: starts[-1]] if "event" not in r and int(r.get("step", 0)) <= first_step]
    return kept + records[starts[-1]:]


def prepared_splits(path: Path) -> List[Path]:
    if (path / MANIFEST).is_file():
        return [path]
    return [path / split for split in ("train", "heldout") if (path / split / MANIFEST).is_file()]


def check_prepared(split: Path, cfg) -> List[Finding]:
    """The prepared-set checks on one split (every row, not a sample), with the tokenizer of the model
    it was prepared with (its folder is in the manifest)."""
    from dpo_zoo.cache.health import prepared_set_checks
    from dpo_zoo.cache.reader import PreparedSet
    from dpo_zoo.model.loading import load_tokenizer

    prepared = PreparedSet.open(split)
    model_path = (prepared.manifest.get("extra") or {}).get("model_path")
    if not model_path or not Path(model_path).is_dir():
        raise DoctorError(f"{split}: the model it was prepared with ({model_path}) is not on this machine; its "
                          "tokenizer is needed to check the rows")
    tokenizer = load_tokenizer(model_path)
    return prepared_set_checks(prepared, tokenizer, max_rows=len(prepared),
                               min_completion_tokens=int(cfg.train.health.min_completion_tokens))


def check_run(folder: Path, cfg, sample: bool = True) -> List[Finding]:
    """Every check that applies to the run folder ``folder`` (module doc)."""
    from omegaconf import OmegaConf

    from dpo_zoo.losses import build_loss

    thresholds = Thresholds.from_config(cfg.train.health)
    run_cfg = OmegaConf.load(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else None
    record = json.loads((folder / RUN_FILE).read_text()) if (folder / RUN_FILE).is_file() else {}
    records = last_run(read_logs(folder / LOGS_FILE))
    source = run_cfg if run_cfg is not None else cfg
    loss_section = dict(OmegaConf.to_container(source.loss, resolve=True))
    loss_section.pop("plugin", None)
    loss = build_loss(loss_section.pop("name"), **loss_section)
    t = source.train
    steps = int(record.get("config", {}).get("train", {}).get("max_steps", t.max_steps)) if not t.epochs else \
        max([int(r.get("step", 0)) for r in records] or [1])
    start = next((int(r.get("step", 0)) for r in records if r.get("event") == "start"), 0)
    findings = series_findings(records, thresholds, needs_reference=loss.needs_reference,
                               pairs_per_step=int(t.micro_batch_size) * int(t.gradient_accumulation_steps),
                               max_steps=steps, warmup_steps=int(t.warmup_steps), start_step=start)
    prepared = Path(record.get("prepared_set") or Path(str(source.prep.output_dir)) / "train")
    if (prepared / MANIFEST).is_file():
        findings += check_prepared(prepared, cfg)
    if sample and (folder / FINAL_DIR).is_dir() and (folder / RUN_FILE).is_file():
        heldout = prepared.parent / "heldout"
        if (heldout / MANIFEST).is_file():
            findings += sampled_findings(folder, heldout, cfg, thresholds, steps)
    return findings


def sampled_findings(folder: Path, heldout_path: Path, cfg, t: Thresholds, step: int) -> List[Finding]:
    """Length drift and KL of the trained policy against its base model on sampled completions."""
    import torch

    from dpo_zoo.cache.reader import PreparedSet
    from dpo_zoo.compare.drift import kl_prompt_ids, kl_samples, summarize_kl
    from dpo_zoo.compare.subjects import BaseModels, load_policy, open_subject
    from dpo_zoo.model.loading import load_tokenizer

    h = cfg.train.health
    device = torch.device("cpu")
    heldout = PreparedSet.open(heldout_path)
    prompts = kl_prompt_ids(heldout, int(h.sample_prompts))
    if not prompts:
        return []
    subject = open_subject(str(folder), cfg, None)
    policy = load_policy(subject, cfg, device)
    base = BaseModels(cfg, device).get(subject.base_model)
    tokenizer = load_tokenizer(subject.base_model)
    settings = dict(n_samples=1, max_new_tokens=int(h.sample_max_new_tokens), eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, batch_size=8, seed=int(cfg.train.seed), device=device,
                    progress=False)
    mine = kl_samples(policy, base, prompts, desc="doctor policy", **settings)
    theirs = kl_samples(base, base, prompts, desc="doctor reference", **settings)
    kl = summarize_kl(mine)
    found = [length_drift(mine["tokens"].tolist(), theirs["tokens"].tolist(), t,
                          max_new_tokens=int(h.sample_max_new_tokens), step=step),
             kl_too_large(kl["rb"], kl["rb_stderr"], t, step=step)]
    return [f for f in found if f is not None]


def run_doctor(target: str, cfg, sample: bool = True) -> List[Finding]:
    """Check ``target`` (a run folder, a prepared split, or a ``prep.output_dir``); print each finding
    (a prepared set's with the split it is in) and return them all."""
    path = Path(target)
    if (path / LOGS_FILE).is_file():
        what, labelled = "run", [("", f) for f in check_run(path, cfg, sample=sample)]
    elif prepared_splits(path):
        what = "prepared set"
        labelled = [(f"{split.name}: ", f) for split in prepared_splits(path) for f in check_prepared(split, cfg)]
    else:
        raise DoctorError(f"{target}: neither a run folder (no {LOGS_FILE}) nor a prepared set (no {MANIFEST} in it "
                          "or in its train/ and heldout/)")
    for label, finding in labelled:
        print(f"[dpo-zoo doctor] {label}{finding.render()}")
    if not labelled:
        print(f"[dpo-zoo doctor] {target}: no problem found ({what})")
    return [f for _, f in labelled]
