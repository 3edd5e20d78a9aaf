"""``dpo-zoo compare``: score trained runs (or one policy under many losses) on held-out pairs.

    dpo-zoo compare runs/dpo runs/sampo --data prepared/x/heldout [--output reports/x]
    dpo-zoo compare runs/dpo --data prepared/x --losses all          # one policy, every registered loss

Reads top to bottom: open the held-out set → open each subject (a run folder, or a model folder) and
check its tokenizer against the set's → per subject: load the policy, decide where reference values
come from, **one policy pass** over the held-out pairs (:func:`score_pairs`), sample completions and
estimate the drift from the reference (:func:`estimate_kl`) → per-pair table → summary metrics
(:mod:`dpo_zoo.metrics.functions`) → ``summary.md`` (also printed), ``summary.json``, ``pairs.csv``,
``pairs.parquet`` and ``report.html`` in the output folder.

**Subjects and entries.** A *subject* is a policy: a run folder written by ``dpo-zoo train`` (its
``run.json`` names the loss, its hyperparameters, the base model and whether ``final/`` holds a LoRA
adapter or full weights), or a plain model folder (full weights, or a PEFT adapter whose
``adapter_config.json`` names a local base model). An *entry* is a subject scored under one loss: a
run's own loss by default, or every loss of ``--losses`` (``all`` or a comma list, at their default
hyperparameters). Each entry's implicit rewards, margin and ``win_prob`` are those its loss defines:
the loss is called on the pass's :class:`~dpo_zoo.losses.PairBatch` and returns them.

**One pass per subject.** The batch is built once per micro-batch with every field that any scored
loss reads (the union of their declared needs; :func:`dpo_zoo.batching.pair_batch`, the code path the
trainer uses), and every loss — the entries' and every registered loss at its defaults, for the
"held-out value of each loss" table — is called on that same batch. Vocabulary-level losses are
scored when the held-out set stores the reference's top-k (``prep.topk``) or the reference runs live;
otherwise they are skipped with a note. A loss that still cannot use the batch (e.g. one that needs
the whole reference vocabulary, not its top-k) is skipped with its own message.

**Reference.** From the prepared set (the cache), unless an entry's loss needs something the set does
not store, or the set's reference weights are not the run's base model: then the reference runs live
from the base model (loaded once per base, no gradients), and the report says why.

**Drift.** ``compare.kl_prompts`` held-out prompts (evenly spaced through the set, so every source of a
mixed set is represented) × ``compare.kl_samples`` completions of at most
``compare.kl_max_new_tokens`` tokens are sampled from the policy at temperature 1 (no top-k/top-p;
a seeded generator, ``train.seed``), stopping at the EOS token. On each sample, with the base model as
reference: the Monte Carlo estimate ``Σ_t log π(y_t|y_<t) − log π_ref(y_t|y_<t)``, the Rao–Blackwellized
estimate ``Σ_t KL(π(·|y_<t) ‖ π_ref(·|y_<t))`` (exact over the vocabulary at each sampled prefix; Amini,
Vieira & Cotterell, *Better Estimation of the Kullback–Leibler Divergence Between Language Models*,
NeurIPS 2025, arXiv:2504.10637) and the policy's entropy ``Σ_t H(π(·|y_<t))``. Both estimators are
unbiased for the KL between the two models' distributions over completions truncated at EOS or the
token limit (the same stopping rule applies to both models); the RB one has variance ≤ MC's and is never
negative. Each is reported with its standard error ``std/√n`` over the samples.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data_prep import schema as S

from .batching import collate, loss_wants, pair_batch
from .config import as_dict, loss_hparams
from .errors import CacheError, UserError
from .logps import completion_logps
from .losses import Loss, LossInputError, Need, build_loss, get_loss_entry, load_loss_plugin, registered_losses
from .metrics import functions as M

RUN_FILE = "run.json"
FINAL_DIR = "final"
LOGPS_NEEDS = (Need.SEQUENCE_LOGPS, Need.TOKEN_LOGPS, Need.VOCAB_LOGPS)


class CompareError(UserError, ValueError):
    """A subject and the held-out set cannot be compared (names the folder, the file and the field)."""


# ==================================================================== the held-out set


def open_heldout(data: str):
    """The prepared set at ``data``: a prepared split folder, or a ``prep.output_dir`` holding ``heldout/``."""
    from .cache import MANIFEST, PreparedSet

    path = Path(data)
    if (path / MANIFEST).is_file():
        return PreparedSet.open(path)
    if (path / "heldout" / MANIFEST).is_file():
        return PreparedSet.open(path / "heldout")
    raise CacheError(
        f"--data {data}: no prepared set there (no {MANIFEST} in {path} or {path / 'heldout'}); "
        "run `dpo-zoo prep` first and pass its `<prep.output_dir>/heldout`"
    )


# ==================================================================== subjects


@dataclass
class Subject:
    """One policy to score, and where its pieces come from."""

    label: str
    path: Path  # what the user named
    weights_dir: Path  # final/ of a run, or the model folder
    base_model: Path  # the reference for drift, and for a live reference
    adapter: bool  # weights_dir holds a PEFT adapter on top of base_model
    losses: List[Tuple[str, Dict[str, Any]]]  # (registered name, hyperparameters): one entry each
    tokenizer_hash: str
    tokenizer_source: str  # where tokenizer_hash was read, for messages
    run_record: Optional[Dict[str, Any]] = None


def _has_tokenizer(folder: Path) -> bool:
    from .models import TOKENIZER_FILES

    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def parse_loss_list(losses: Optional[str]) -> Optional[List[str]]:
    """``None`` (each run's own loss), ``"all"`` (every registered name) or a comma list (checked)."""
    if losses is None:
        return None
    if losses.strip() == "all":
        return sorted(registered_losses())
    names = [name.strip() for name in losses.split(",") if name.strip()]
    if not names:
        raise CompareError("--losses: give 'all' or a comma-separated list of registered loss names")
    for name in names:
        get_loss_entry(name)  # a LossConfigError naming the unknown loss and the registered ones
    return names


def open_subject(path: str, cfg, loss_names: Optional[List[str]]) -> Subject:
    """Read a run folder (``run.json`` + ``final/``), a model folder or a Hub model name (``org/name``,
    fetched at ``model.revision`` when it is ``model.name_or_path``, else at ``main``) into a
    :class:`Subject`."""
    from .models import DEFAULT_REVISION, is_hub_repo_id, resolve_hub_model, resolve_model_path, tokenizer_fingerprint

    folder = Path(path)
    label = folder.name
    if not folder.exists() and is_hub_repo_id(str(path)):
        same = str(path) == str(cfg.model.name_or_path)
        folder = resolve_hub_model(str(path), str(cfg.model.revision) if same else DEFAULT_REVISION).path
        label = str(path)
    if folder.name == FINAL_DIR and (folder.parent / RUN_FILE).is_file():
        folder = folder.parent  # `runs/dpo/final` names the run `runs/dpo`
    if (folder / RUN_FILE).is_file():
        try:
            record = json.loads((folder / RUN_FILE).read_text())
        except ValueError as err:
            raise CompareError(f"{folder / RUN_FILE}: not valid JSON ({err})") from None
        for key in ("loss", "loss_hparams", "base_model"):
            if key not in record:
                raise CompareError(f"{folder / RUN_FILE}: missing field `{key}` (was it written by `dpo-zoo train`?)")
        weights_dir = folder / FINAL_DIR
        if not weights_dir.is_dir():
            raise CompareError(f"run folder {folder} has no {FINAL_DIR}/: the run did not finish")
        plugin = (record.get("config") or {}).get("loss", {}).get("plugin")
        if plugin:
            load_loss_plugin(str(plugin))
        base = _run_base_model(folder / RUN_FILE, record)
        token_hash = (record.get("cache_key") or {}).get("tokenizer")
        source = f"{folder / RUN_FILE} `cache_key.tokenizer`"
        if not token_hash:
            token_hash, source = tokenizer_fingerprint(base), f"the base model's tokenizer ({base})"
        own = [(str(record["loss"]), dict(record["loss_hparams"]))]
        adapter = bool(record.get("lora")) or (weights_dir / "adapter_config.json").is_file()
        return Subject(label=folder.name, path=folder, weights_dir=weights_dir, base_model=base, adapter=adapter,
                       losses=_entry_losses(own, loss_names), tokenizer_hash=token_hash, tokenizer_source=source,
                       run_record=record)

    if (folder / "adapter_config.json").is_file():
        try:
            adapter_config = json.loads((folder / "adapter_config.json").read_text())
        except ValueError as err:
            raise CompareError(f"{folder / 'adapter_config.json'}: not valid JSON ({err})") from None
        base = _adapter_base_model(folder / "adapter_config.json", adapter_config)
        adapter = True
    elif (folder / "config.json").is_file():
        base, adapter = resolve_model_path(cfg.model), False
    else:
        raise CompareError(
            f"{folder}: neither a run folder ({RUN_FILE} + {FINAL_DIR}/) nor a model folder (config.json or "
            "adapter_config.json)"
        )
    tokenizer_dir = folder if _has_tokenizer(folder) else base
    name, hparams = loss_hparams(cfg)
    return Subject(label=label, path=folder, weights_dir=folder, base_model=Path(base), adapter=adapter,
                   losses=_entry_losses([(name, hparams)], loss_names),
                   tokenizer_hash=tokenizer_fingerprint(tokenizer_dir),
                   tokenizer_source=f"the tokenizer files in {tokenizer_dir}")


def _run_base_model(run_file: Path, record: Dict[str, Any]) -> Path:
    """The base model of a run: the folder ``run.json`` names, or, where that folder is not on this
    machine and the base came from the Hub, the same commit fetched again (from the Hugging Face cache
    when it is there)."""
    from .models import resolve_hub_model

    base = Path(record["base_model"])
    if base.is_dir():
        return base
    source = record.get("base_model_source") or {}
    if source.get("commit"):
        return resolve_hub_model(str(source["name_or_path"]), str(source["commit"])).path
    raise CompareError(f"{run_file}: `base_model` {base} is not a folder on this machine")


def _adapter_base_model(config_file: Path, adapter_config: Dict[str, Any]) -> Path:
    """The base of a PEFT adapter folder: ``base_model_name_or_path`` as a local folder, else as a Hub
    repo at the adapter's ``revision`` (``main`` when it records none)."""
    from .models import DEFAULT_REVISION, is_hub_repo_id, resolve_hub_model

    name = str(adapter_config.get("base_model_name_or_path") or "")
    if name and Path(name).is_dir():
        return Path(name)
    if is_hub_repo_id(name):
        return resolve_hub_model(name, str(adapter_config.get("revision") or DEFAULT_REVISION)).path
    raise CompareError(
        f"{config_file}: `base_model_name_or_path` {name!r} is neither a local model folder nor a Hugging Face "
        "Hub name (org/name)"
    )


def _entry_losses(own, loss_names):
    return own if loss_names is None else [(name, {}) for name in loss_names]


def check_tokenizer(subject: Subject, heldout) -> None:
    """Token ids mean nothing under another tokenizer: refuse, naming both sides and the fix."""
    expected = heldout.key.get("tokenizer")
    if expected and expected != subject.tokenizer_hash:
        raise CompareError(
            f"{subject.path} and the held-out set at {heldout.path} use different tokenizers: "
            f"{subject.tokenizer_hash[:12]}… (from {subject.tokenizer_source}) vs {str(expected)[:12]}… "
            f"({heldout.path / 'manifest.json'} `key.tokenizer`). Prepare the held-out data with this model "
            f"(model.name_or_path={subject.base_model}) and compare on that"
        )


def _unique_labels(subjects: Sequence[Subject]) -> None:
    """Folder names, made unique with their parent folder (then a counter) when two collide."""
    names = [s.label for s in subjects]
    for subject in subjects:
        if names.count(subject.label) > 1:
            subject.label = f"{subject.path.parent.name}/{subject.path.name}"
    seen: Dict[str, int] = {}
    for subject in subjects:
        seen[subject.label] = seen.get(subject.label, 0) + 1
        if seen[subject.label] > 1:
            subject.label = f"{subject.label}#{seen[subject.label]}"


# ==================================================================== models


def load_policy(subject: Subject, cfg, device: torch.device):
    """The subject's policy in eval mode, no gradients: full weights, or base + PEFT adapter.

    Safetensors only (a folder with pickled weights only is refused by :func:`check_safetensors_folder`),
    and a folder's own Python code runs only with ``model.trust_remote_code=true``.
    """
    from .models import check_safetensors_folder, load_model

    remote = bool(cfg.model.trust_remote_code)
    check_safetensors_folder(subject.weights_dir)
    if subject.adapter:
        from peft import PeftModel

        if not (subject.weights_dir / "adapter_model.safetensors").is_file():
            raise CompareError(f"{subject.weights_dir}: a PEFT adapter folder without adapter_model.safetensors")
        base = load_model(subject.base_model, dtype="float32", trust_remote_code=remote)
        model = PeftModel.from_pretrained(base, str(subject.weights_dir), is_trainable=False)
    else:
        model = load_model(subject.weights_dir, dtype="float32", trust_remote_code=remote)
    return model.to(device).eval().requires_grad_(False)


class BaseModels:
    """Base (reference) models, each loaded once however many subjects share it."""

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device, self._models = cfg, device, {}

    def get(self, path: Path):
        from .models import load_model

        key = str(Path(path).resolve())
        if key not in self._models:
            model = load_model(path, dtype="float32", trust_remote_code=bool(self.cfg.model.trust_remote_code))
            self._models[key] = model.to(self.device).eval().requires_grad_(False)
        return self._models[key]


# ==================================================================== which losses, which reference


@dataclass(frozen=True)
class BatchNeeds:
    """What one :func:`pair_batch` call fills to serve several losses at once: the union of their needs
    (``pair_batch`` reads only ``requires``, ``optional`` and ``needs_reference`` of a loss). The
    reference is always wanted, reference-free losses or not: compare reports every subject's drift
    from it (log-prob shift, implicit KL)."""

    requires: frozenset
    optional: frozenset = frozenset()
    needs_reference: bool = True

    @classmethod
    def union(cls, losses: Sequence[Loss]) -> "BatchNeeds":
        wants = frozenset().union(*(loss_wants(loss) for loss in losses)) if losses else frozenset()
        return cls(requires=wants, needs_reference=True)


def missing_inputs(loss: Loss, provides, live_reference: bool) -> List[str]:
    """The needs of ``loss`` that neither the prepared set nor a live reference can serve."""
    missing = []
    for need in sorted(loss.requires, key=str):
        if need is Need.GENERATOR:
            continue  # compare seeds one
        if need in LOGPS_NEEDS and live_reference:
            continue  # the policy pass gives the policy side, the live reference the rest
        if need not in provides:
            missing.append(need.value)
    return missing


def _loss_key(name: str, hparams: Dict[str, Any]) -> str:
    """A loss identified by its name and *all* its hyperparameters, so equal losses are scored once."""
    full = {**get_loss_entry(name).defaults(), **hparams}
    return f"{name} {json.dumps(full, sort_keys=True, default=str)}"


def plan_reference(subject: Subject, own: Sequence[Loss], heldout, notes: List[str]) -> bool:
    """True when this subject's reference must run live (and why, in ``notes``); False: the cache."""
    from .models import weights_fingerprint

    reasons = []
    if not heldout.has_reference:
        reasons.append(f"{heldout.path} holds no reference log-probs (prepared with prep.reference=false)")
    for loss in own:
        lacking = missing_inputs(loss, heldout.provides, live_reference=False)
        if lacking:
            reasons.append(f"its loss '{loss.name}' needs {', '.join(lacking)}, which {heldout.path} does not store")
    cached_weights = heldout.key.get("model_weights")
    if subject.run_record is not None and cached_weights:
        if dict(cached_weights) != weights_fingerprint(subject.base_model):
            reasons.append(f"the reference log-probs in {heldout.path} were computed by another model than the "
                           f"run's base model {subject.base_model}")
    if reasons:
        notes.append(f"{subject.label}: reference run live from {subject.base_model}: " + "; ".join(reasons) + ".")
    return bool(reasons)


# ==================================================================== the pass


@dataclass
class ScoredPass:
    """Per-pair values of one policy pass: shared columns and, per scored loss key, its outputs."""

    columns: Dict[str, np.ndarray]
    outputs: Dict[str, Dict[str, np.ndarray]]  # loss key -> losses, chosen_rewards, rejected_rewards, win_prob, tie_prob
    skipped: Dict[str, str]  # loss key -> why it could not be scored
    forward_seconds: float = 0.0


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


def score_pairs(policy, losses: Dict[str, Loss], heldout, *, pad_id: int, batch_size: int, seed: int,
                device: torch.device, required: Sequence[str] = (), reference_model=None,
                progress: bool = True, desc: str = "score") -> ScoredPass:
    """One policy pass over the held-out set; every loss of ``losses`` is called on each batch.

    Losses in ``required`` must work (their error propagates); any other loss that raises a
    :class:`LossInputError` is skipped with that message. A loss that samples (SamPO) gets a fresh
    generator per batch seeded from ``(seed, batch)``, the same for every loss, so its draws do not
    depend on which other losses are scored.
    """
    from tqdm.auto import tqdm

    needs = BatchNeeds.union(list(losses.values()))
    columns: Dict[str, List[np.ndarray]] = {}
    outputs: Dict[str, Dict[str, List[np.ndarray]]] = {key: {} for key in losses}
    skipped: Dict[str, str] = {}
    ids: List[str] = []
    n = len(heldout)
    starts = range(0, n, batch_size)
    forward_seconds = 0.0
    for batch_index, start in enumerate(tqdm(starts, desc=desc, unit="batch", disable=not progress)):
        rows = heldout.rows(list(range(start, min(start + batch_size, n))))
        collated = collate(rows, pad_id).to(device)
        started = time.perf_counter()
        with torch.no_grad():
            forward = pair_batch(needs, policy, collated, reference_model=reference_model)
        forward_seconds += time.perf_counter() - started
        batch = forward.batch
        ids.extend(collated.ids)
        chosen_start = np.array([r[S.CHOSEN_COMPLETION_START] for r in rows])
        values = {
            "prompt_len": chosen_start,
            "chosen_len": np.array([len(r[S.CHOSEN_INPUT_IDS]) for r in rows]) - chosen_start,
            "rejected_len": np.array([len(r[S.REJECTED_INPUT_IDS]) - r[S.REJECTED_COMPLETION_START] for r in rows]),
            "is_tie": np.array([bool(r.get(S.IS_TIE, False)) for r in rows]),
            "weight": np.array([float(r.get(S.WEIGHT, 1.0)) for r in rows]),
            "soft_label": np.array([math.nan if r.get(S.SOFT_LABEL) is None else float(r[S.SOFT_LABEL]) for r in rows]),
        }
        for model_name in ("policy", "reference"):
            for side in ("chosen", "rejected"):
                values[f"{model_name}_{side}_logps"] = _as_numpy(batch.sequence_logps(model_name, side))
        for name, value in values.items():
            columns.setdefault(name, []).append(value)

        for key, loss in losses.items():
            if key in skipped:
                continue
            batch.generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_index)
            try:
                with torch.no_grad():
                    out = loss(batch)
            except LossInputError as err:
                if key in required:
                    raise
                skipped[key] = str(err)
                continue
            win_prob = out.metrics.get("win_prob")
            if win_prob is None:  # a third-party loss without it: the Bradley–Terry reading of its margin
                win_prob = torch.sigmoid(out.chosen_rewards - out.rejected_rewards)
            record = {
                "losses": out.losses,
                "chosen_rewards": out.chosen_rewards,
                "rejected_rewards": out.rejected_rewards,
                "win_prob": win_prob,
            }
            if "tie_prob" in out.metrics:
                record["tie_prob"] = out.metrics["tie_prob"]
            for name, value in record.items():
                outputs[key].setdefault(name, []).append(_as_numpy(value.reshape(-1)))
    columns_np = {name: np.concatenate(parts) for name, parts in columns.items()}
    columns_np["id"] = np.array(ids, dtype=object)
    outputs_np = {
        key: {name: np.concatenate(parts) for name, parts in values.items()}
        for key, values in outputs.items() if key not in skipped
    }
    return ScoredPass(columns=columns_np, outputs=outputs_np, skipped=skipped, forward_seconds=forward_seconds)


# ==================================================================== drift from the reference


def kl_prompt_ids(heldout, n_prompts: int) -> List[List[int]]:
    """Prompt token ids of ``n_prompts`` held-out pairs spread evenly through the set (all when fewer)."""
    n = len(heldout)
    if n == 0 or n_prompts == 0:
        return []
    indices = sorted(set(np.linspace(0, n - 1, num=min(n_prompts, n)).round().astype(int).tolist()))
    rows = heldout.rows(indices, columns=[S.CHOSEN_INPUT_IDS, S.CHOSEN_COMPLETION_START])
    return [list(r[S.CHOSEN_INPUT_IDS][: r[S.CHOSEN_COMPLETION_START]]) for r in rows]


@torch.no_grad()
def sample_completions(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_token_id: Optional[int],
                       pad_token_id: int, generator: torch.Generator, device: torch.device) -> List[List[int]]:
    """One completion per prompt, sampled from ``model`` at temperature 1 (the plain softmax: no top-k,
    top-p or penalties), ending at the first EOS (kept) or after ``max_new_tokens`` tokens.

    Prompts of a batch are left-padded and decoded together with the key/value cache; positions count
    from each prompt's first real token, so padding changes no value.
    """
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in prompts]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention[i, width - len(prompt):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps: List[torch.Tensor] = []
    for step in range(max_new_tokens):
        probs = torch.softmax(logits.float(), dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        steps.append(token.masked_fill(finished, -1))  # -1 marks "already ended"
        if eos_token_id is not None:
            finished = finished | (token == eos_token_id)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token.unsqueeze(-1), attention_mask=attention, position_ids=positions,
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    tokens = torch.stack(steps, dim=1).cpu().tolist()
    return [[t for t in row if t >= 0] for row in tokens]


def sequence_kl_terms(policy_vocab_logps: torch.Tensor, reference_vocab_logps: torch.Tensor,
                      labels: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-sample KL estimates and entropy from per-position log-distributions ``[N,T,V]``.

    With ``p_t = π(·|y_<t)`` and ``q_t = π_ref(·|y_<t)`` at the sampled prefixes:

    * ``mc``  = ``Σ_t log p_t(y_t) − log q_t(y_t)`` (the plain Monte Carlo estimator of KL(π‖π_ref));
    * ``rb``  = ``Σ_t Σ_v p_t(v) (log p_t(v) − log q_t(v))`` (Rao–Blackwellized, arXiv:2504.10637:
      the conditional expectation of the MC term at each position given the prefix);
    * ``entropy`` = ``Σ_t −Σ_v p_t(v) log p_t(v)``; ``tokens`` = the number of positions.

    Entries with ``p_t(v) = 0`` contribute 0 (``0 · log 0 = 0``), never NaN.
    """
    mask_f = mask.to(policy_vocab_logps.dtype)
    p = policy_vocab_logps.exp()
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    kl_terms = torch.where(p > 0, p * (policy_vocab_logps - reference_vocab_logps), zero).sum(-1)
    entropy_terms = torch.where(p > 0, -p * policy_vocab_logps, zero).sum(-1)
    index = labels.clamp(min=0).unsqueeze(-1)
    log_ratio = (policy_vocab_logps.gather(-1, index) - reference_vocab_logps.gather(-1, index)).squeeze(-1)
    return {
        "mc": (log_ratio * mask_f).sum(-1),
        "rb": (kl_terms * mask_f).sum(-1),
        "entropy": (entropy_terms * mask_f).sum(-1),
        "tokens": mask_f.sum(-1),
    }


def kl_samples(policy, reference, prompts: Sequence[Sequence[int]], *, n_samples: int, max_new_tokens: int,
               eos_token_id: Optional[int], pad_token_id: int, batch_size: int, seed: int, device: torch.device,
               progress: bool = True, desc: str = "kl") -> Dict[str, Any]:
    """Sample ``n_samples`` completions per prompt from ``policy`` and score each under both models.

    Returns per-sample arrays ``mc``, ``rb``, ``entropy``, ``tokens`` and the ``completions`` (token ids),
    prompt-major. The log-probs of the samples come from :func:`dpo_zoo.logps.completion_logps` on
    ``prompt + completion`` (the shared code path), not from the sampling loop.
    """
    from tqdm.auto import tqdm

    generator = torch.Generator(device=device).manual_seed(seed)
    rows = [list(p) for p in prompts for _ in range(n_samples)]
    result: Dict[str, List] = {"mc": [], "rb": [], "entropy": [], "tokens": [], "completions": []}
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", disable=not progress):
        chunk = rows[start:start + batch_size]
        completions = sample_completions(policy, chunk, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                         pad_token_id=pad_token_id, generator=generator, device=device)
        sequences = [p + c for p, c in zip(chunk, completions)]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, sequence in enumerate(sequences):
            input_ids[i, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
            attention[i, : len(sequence)] = 1
        starts = torch.tensor([len(p) for p in chunk], dtype=torch.long)
        input_ids, attention, starts = input_ids.to(device), attention.to(device), starts.to(device)
        with torch.no_grad():
            mine = completion_logps(policy, input_ids, attention, starts, vocab=True)
            theirs = completion_logps(reference, input_ids, attention, starts, vocab=True)
        terms = sequence_kl_terms(mine.vocab_logps, theirs.vocab_logps, mine.labels, mine.mask)
        for name, value in terms.items():
            result[name].append(_as_numpy(value))
        result["completions"].extend(completions)
    out: Dict[str, Any] = {name: np.concatenate(result[name]) if result[name] else np.zeros(0)
                           for name in ("mc", "rb", "entropy", "tokens")}
    out["completions"] = result["completions"]
    return out


def summarize_kl(samples: Dict[str, Any]) -> Dict[str, Any]:
    """Means with standard errors of the per-sample estimates, and the mean entropy per token."""
    mc, rb = M.mean_and_stderr(samples["mc"]), M.mean_and_stderr(samples["rb"])
    tokens = float(np.sum(samples["tokens"]))
    return {
        "mc": mc["mean"], "mc_stderr": mc["stderr"],
        "rb": rb["mean"], "rb_stderr": rb["stderr"],
        "entropy_per_token": float(np.sum(samples["entropy"]) / tokens) if tokens else math.nan,
        "mean_length": float(np.mean(samples["tokens"])) if len(samples["tokens"]) else math.nan,
        "n_samples": mc["n"],
    }


# ==================================================================== metrics of one entry


def summarize_entry(columns: Dict[str, np.ndarray], output: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Every summary metric of one entry (see :mod:`dpo_zoo.metrics.functions` for each definition)."""
    margins = output["chosen_rewards"] - output["rejected_rewards"]
    ties = columns["is_tie"]
    tie = M.tie_summary(margins, ties, output.get("tie_prob"))
    spread = M.margin_summary(margins, ties)
    labels = M.pair_labels(columns["soft_label"], len(margins))
    # Calibration is judged on the decided (non-tie) pairs, so a tie-aware loss's win probability is
    # taken conditional on "not a tie" (see M.decided_win_prob).
    calibrated = ~ties
    win_prob = M.decided_win_prob(output["win_prob"], output.get("tie_prob"))
    length_diff = columns["chosen_len"] - columns["rejected_len"]
    # A margin within float32 rounding of 0 (the policy's pass and the cached reference batch the pairs
    # differently) is scored as no preference, ½, and counted in rewards/zero_margins.
    zero = M.rounding_tolerance(*(columns[f"{model}_{side}_logps"] for model in ("policy", "reference")
                                  for side in ("chosen", "rejected")))
    length = M.length_bias(margins, length_diff, ties, tolerance=zero)
    return {
        "pairs": int(len(margins)),
        "ties": int(ties.sum()),
        "rewards/accuracies": M.preference_accuracy(margins, ties, tolerance=zero),
        "rewards/zero_margins": M.zero_margin_count(margins, ties, tolerance=zero),
        "rewards/margins": spread["mean"],
        "rewards/margins_std": spread["std"],
        "rewards/chosen": float(np.mean(output["chosen_rewards"])) if len(margins) else math.nan,
        "rewards/rejected": float(np.mean(output["rejected_rewards"])) if len(margins) else math.nan,
        "ties/abs_margin": tie["abs_margin"],
        "ties/tie_prob": tie["tie_prob"],
        "calibration/ece": M.expected_calibration_error(win_prob[calibrated], labels[calibrated]),
        "calibration/brier": M.brier_score(win_prob[calibrated], labels[calibrated]),
        "length/correlation": length["correlation"],
        "length/acc_chosen_longer": length["acc_chosen_longer"],
        "length/acc_rejected_longer": length["acc_rejected_longer"],
        "length/acc_same_length": length["acc_same_length"],
        "length/n_chosen_longer": length["n_chosen_longer"],
        "length/n_rejected_longer": length["n_rejected_longer"],
        "logps/chosen": float(np.mean(columns["policy_chosen_logps"])) if len(margins) else math.nan,
        "logps/rejected": float(np.mean(columns["policy_rejected_logps"])) if len(margins) else math.nan,
        "logps/chosen_shift": M.logp_shift(columns["policy_chosen_logps"], columns["reference_chosen_logps"]),
        "logps/rejected_shift": M.logp_shift(columns["policy_rejected_logps"], columns["reference_rejected_logps"]),
        "loss": M.weighted_mean(output["losses"], columns["weight"]),
        "calibration/bins": M.calibration_bins(win_prob[calibrated], labels[calibrated]),
    }


# ==================================================================== the command


@dataclass
class Entry:
    """One row of the comparison: a subject under one loss."""

    label: str
    subject: Subject
    loss_name: str
    loss_hparams: Dict[str, Any]
    key: str
    reference: str = "cache"
    metrics: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SubjectResult:
    """Everything one subject contributes to the report."""

    entries: List[Entry]
    tables: List[Dict[str, np.ndarray]]
    heldout_losses: Dict[str, Dict[str, Any]]
    kl: Dict[str, Any]
    samples: List[str]
    timings: Dict[str, float]


def run_compare(cfg, runs: Sequence[str], data: str, losses: Optional[str] = None,
                output_dir: Optional[str] = None) -> Dict[str, Any]:
    """Compare ``runs`` on the held-out set ``data``; write the report to ``output_dir`` (default
    ``compare.output_dir``); print the markdown summary; return the summary (as in ``summary.json``)."""
    from .compare_report import write_outputs

    started = time.perf_counter()
    c = cfg.compare
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(output_dir or c.output_dir)

    heldout = open_heldout(data)
    if len(heldout) == 0:
        raise CompareError(f"the held-out set at {heldout.path} has no pairs")
    notes: List[str] = []
    if heldout.key.get("split") not in (None, "heldout"):
        notes.append(f"{heldout.path} is the '{heldout.key.get('split')}' split, not held-out data.")
    loss_names = parse_loss_list(losses)
    subjects = [open_subject(path, cfg, loss_names) for path in runs]
    for subject in subjects:
        check_tokenizer(subject, heldout)
    _unique_labels(subjects)

    inputs = compare_inputs(cfg, subjects, heldout, loss_names)
    if not c.overwrite and report_is_current(out_dir, inputs):
        print((out_dir / "summary.md").read_text(encoding="utf-8"))
        print(f"[dpo-zoo compare] {out_dir} already holds this comparison (same runs, held-out set and settings); "
              "reusing it (set compare.overwrite=true to recompute)")
        return json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))

    bases = BaseModels(cfg, device)
    results = {s.label: score_subject(s, cfg, heldout, listed=loss_names is not None, several=len(subjects) > 1,
                                      bases=bases, device=device, notes=notes)
               for s in subjects}
    entries = [e for r in results.values() for e in r.entries]
    tables = [t for r in results.values() for t in r.tables]
    if not entries:
        raise CompareError("no entry could be scored: " + " ".join(notes))

    summary = {
        "data": {"path": str(heldout.path), "pairs": len(heldout), "ties": int(np.sum(tables[0]["is_tie"])),
                 "provides": sorted(str(n) for n in heldout.provides), "topk": heldout.topk,
                 "key_digest": heldout.manifest.get("key_digest")},
        "entries": [
            {"label": e.label, "subject": e.subject.label, "path": str(e.subject.path), "loss": e.loss_name,
             "loss_hparams": e.loss_hparams, "lora": e.subject.adapter, "base_model": str(e.subject.base_model),
             "reference": e.reference, "metrics": e.metrics, "kl": results[e.subject.label].kl}
            for e in entries
        ],
        "heldout_losses": {label: r.heldout_losses for label, r in results.items()},
        "samples": {label: r.samples for label, r in results.items()},
        "timings": {label: r.timings for label, r in results.items()},
        "notes": notes,
        "settings": {"seed": int(cfg.train.seed), "batch_size": int(c.batch_size), "kl_prompts": int(c.kl_prompts),
                     "kl_samples": int(c.kl_samples), "kl_max_new_tokens": int(c.kl_max_new_tokens),
                     "ece_bins": 10, "device": str(device)},
        "config": as_dict(cfg),
    }
    summary["timings"]["total_seconds"] = time.perf_counter() - started
    (out_dir / INPUTS_FILE).unlink(missing_ok=True)  # a report being rewritten is not current
    markdown = write_outputs(summary, tables, out_dir)
    (out_dir / INPUTS_FILE).write_text(json.dumps(inputs, indent=1, default=str) + "\n", encoding="utf-8")
    print(markdown)
    print(f"[dpo-zoo compare] wrote {out_dir}: summary.md, summary.json, pairs.csv, pairs.parquet, report.html")
    return M.json_ready(summary)


# Written last, once every report file is complete: what the report was computed from.
INPUTS_FILE = "inputs.json"
REPORT_FILES = ("summary.md", "summary.json", "pairs.csv", "pairs.parquet", "report.html")
# Settings that do not change any number of the report.
REPORT_ONLY_SETTINGS = ("output_dir", "progress", "overwrite")


def _file_stats(folder: Path, skip: Sequence[str] = ()) -> List[Tuple[str, int, int]]:
    """(relative path, size, mtime in ns) of every file under ``folder``: changes when any file is rewritten."""
    out = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not (relative.parts and relative.parts[0] in skip):
            stat = path.stat()
            out.append((str(relative), stat.st_size, stat.st_mtime_ns))
    return out


def compare_inputs(cfg, subjects: Sequence[Subject], heldout, loss_names: Optional[List[str]]) -> Dict[str, Any]:
    """Everything a comparison's numbers depend on: each subject's weights and record (files by size and
    modification time) and its base model, the held-out set's manifest, the loss list, the settings
    (less :data:`REPORT_ONLY_SETTINGS`) and the dpo_zoo version."""
    from . import __version__

    config = json.loads(json.dumps(as_dict(cfg), default=str))
    for key in REPORT_ONLY_SETTINGS:
        config["compare"].pop(key, None)
    return {
        "version": __version__,
        "subjects": [
            {"path": str(s.path.resolve()), "weights": _file_stats(s.weights_dir),
             "run_record": s.run_record, "base_model": str(s.base_model), "base_files": _file_stats(s.base_model)}
            for s in subjects
        ],
        "heldout": {"path": str(Path(heldout.path).resolve()), "manifest": heldout.manifest},
        "losses": loss_names,
        "config": config,
    }


def report_is_current(out_dir: Path, inputs: Dict[str, Any]) -> bool:
    """Whether ``out_dir`` holds a complete report computed from exactly ``inputs``."""
    marker = out_dir / INPUTS_FILE
    if not marker.is_file() or not all((out_dir / name).is_file() for name in REPORT_FILES):
        return False
    try:
        stored = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return stored == json.loads(json.dumps(inputs, default=str))


def score_subject(subject: Subject, cfg, heldout, *, listed: bool, several: bool, bases: BaseModels,
                  device: torch.device, notes: List[str]) -> SubjectResult:
    """Load one policy, make its one pass (cache reference, or live when needed), estimate its drift.

    ``listed``: the entries are the ``--losses`` list (scored when the data allows, else skipped with
    a note) rather than the subject's own loss (which must be scored, with a live reference if need be).
    """
    from .models import load_tokenizer

    c, seed = cfg.compare, int(cfg.train.seed)
    timer = time.perf_counter()
    tokenizer = load_tokenizer(subject.weights_dir if _has_tokenizer(subject.weights_dir) else subject.base_model)
    policy = load_policy(subject, cfg, device)
    timings = {"load_seconds": time.perf_counter() - timer}

    entry_keys = [_loss_key(name, hparams) for name, hparams in subject.losses]
    own = {key: _built(name, hparams) for key, (name, hparams) in zip(entry_keys, subject.losses)}
    required = [] if listed else list(own)
    defaults = {name: _loss_key(name, {}) for name in sorted(registered_losses())}
    live = plan_reference(subject, [own[k] for k in required], heldout, notes)

    def one_pass(live: bool) -> ScoredPass:
        scored: Dict[str, Loss] = {}
        for key, loss in [*own.items(), *((k, _built(n, {})) for n, k in defaults.items())]:
            if key not in scored and (key in required or not missing_inputs(loss, heldout.provides, live)):
                scored[key] = loss
        return score_pairs(policy, scored, heldout, pad_id=tokenizer.pad_token_id, batch_size=int(c.batch_size),
                           seed=seed, device=device, required=required,
                           reference_model=bases.get(subject.base_model) if live else None,
                           progress=bool(c.progress), desc=f"score {subject.label}")

    timer = time.perf_counter()
    try:
        scored_pass = one_pass(live)
    except LossInputError as err:
        if live:
            raise
        # The declared needs looked satisfied but the loss cannot use what the cache stores (e.g. a
        # top-k reference where it ranks the whole vocabulary): the reference runs live instead.
        notes.append(f"{subject.label}: reference run live from {subject.base_model}: {err}")
        live = True
        scored_pass = one_pass(live)
    timings["pass_seconds"] = time.perf_counter() - timer
    timings["forward_seconds"] = scored_pass.forward_seconds

    heldout_losses: Dict[str, Dict[str, Any]] = {}
    for name, key in defaults.items():
        heldout_losses[name] = _loss_cell(scored_pass, key, _built(name, {}), heldout, live)

    timer = time.perf_counter()
    kl, samples = _drift(subject, policy, bases, heldout, tokenizer, cfg, device, seed, notes)
    timings["kl_seconds"] = time.perf_counter() - timer

    entries, tables = [], []
    for (name, hparams), key in zip(subject.losses, entry_keys):
        label = subject.label if not listed else (f"{subject.label}:{name}" if several else name)
        if key not in scored_pass.outputs:
            cell = _loss_cell(scored_pass, key, own[key], heldout, live)
            notes.append(f"{label}: not scored: {cell['skipped']}")
            continue
        entry = Entry(label=label, subject=subject, loss_name=name,
                      loss_hparams={**get_loss_entry(name).defaults(), **hparams}, key=key,
                      reference="live" if live else "cache")
        entry.metrics = summarize_entry(scored_pass.columns, scored_pass.outputs[key])
        entries.append(entry)
        tables.append(_pair_rows(entry, scored_pass, defaults))
    del policy
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return SubjectResult(entries=entries, tables=tables, heldout_losses=heldout_losses, kl=kl, samples=samples,
                         timings=timings)


def _loss_cell(scored_pass: ScoredPass, key: str, loss: Loss, heldout, live: bool) -> Dict[str, Any]:
    """A loss's held-out value (the trainer's reduction, mean of weight × loss), or why it has none."""
    if key in scored_pass.outputs:
        return {"value": M.weighted_mean(scored_pass.outputs[key]["losses"], scored_pass.columns["weight"])}
    if key in scored_pass.skipped:
        return {"value": None, "skipped": scored_pass.skipped[key]}
    lacking = missing_inputs(loss, heldout.provides, live)
    hint = " (prepare with prep.topk>0 for vocabulary-level losses)" if Need.VOCAB_LOGPS.value in lacking else ""
    return {"value": None, "skipped": f"needs {', '.join(lacking)}, which {heldout.path} does not store{hint}"}


def _built(name: str, hparams: Dict[str, Any]) -> Loss:
    return build_loss(name, **hparams)


def _drift(subject: Subject, policy, bases: BaseModels, heldout, tokenizer, cfg, device, seed: int,
           notes: List[str]) -> Tuple[Dict[str, Any], List[str]]:
    """KL estimates of one subject against its base model, and a few decoded samples for the report."""
    c = cfg.compare
    prompts = kl_prompt_ids(heldout, int(c.kl_prompts))
    if not prompts or int(c.kl_samples) == 0 or int(c.kl_max_new_tokens) == 0:
        if not any(note.startswith("KL skipped") for note in notes):
            notes.append("KL skipped: compare.kl_prompts, compare.kl_samples or compare.kl_max_new_tokens is 0.")
        return {"mc": None, "mc_stderr": None, "rb": None, "rb_stderr": None, "entropy_per_token": None,
                "mean_length": None, "n_samples": 0}, []
    reference = bases.get(subject.base_model)
    samples = kl_samples(policy, reference, prompts, n_samples=int(c.kl_samples),
                         max_new_tokens=int(c.kl_max_new_tokens), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, batch_size=int(c.batch_size), seed=seed, device=device,
                         progress=bool(c.progress), desc=f"kl {subject.label}")
    texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in samples["completions"][:6]]
    return summarize_kl(samples), texts


def _pair_rows(entry: Entry, scored_pass: ScoredPass, default_keys: Dict[str, str]) -> Dict[str, np.ndarray]:
    """The per-pair table of one entry (one row per held-out pair)."""
    columns = scored_pass.columns
    output = scored_pass.outputs[entry.key]
    n = len(columns["id"])
    table: Dict[str, Any] = {
        "entry": np.array([entry.label] * n, dtype=object),
        "subject": np.array([entry.subject.label] * n, dtype=object),
        "loss_name": np.array([entry.loss_name] * n, dtype=object),
        "id": columns["id"],
        "prompt_len": columns["prompt_len"],
        "chosen_len": columns["chosen_len"],
        "rejected_len": columns["rejected_len"],
        "length_diff": columns["chosen_len"] - columns["rejected_len"],
        "is_tie": columns["is_tie"],
        "soft_label": columns["soft_label"],
        "weight": columns["weight"],
        "policy_chosen_logps": columns["policy_chosen_logps"],
        "policy_rejected_logps": columns["policy_rejected_logps"],
        "reference_chosen_logps": columns["reference_chosen_logps"],
        "reference_rejected_logps": columns["reference_rejected_logps"],
        "reward_chosen": output["chosen_rewards"],
        "reward_rejected": output["rejected_rewards"],
        "margin": output["chosen_rewards"] - output["rejected_rewards"],
        "win_prob": output["win_prob"],
        "tie_prob": output.get("tie_prob", np.full(n, math.nan)),
        "loss": output["losses"],
    }
    for name, key in default_keys.items():
        values = scored_pass.outputs.get(key)
        table[f"loss/{name}"] = values["losses"] if values is not None else np.full(n, math.nan)
    return table
