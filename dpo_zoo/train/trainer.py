"""One pairwise trainer for every registered loss, on a DeepSpeed engine.

Reads top to bottom (the engine itself is :mod:`dpo_zoo.train.engine`, the process group
:mod:`dpo_zoo.parallel.process_group`, checkpoints and the final save :mod:`dpo_zoo.train.saving`, the run folder's files
:mod:`dpo_zoo.train.run_folder`): open the prepared sets (the reference cache) → reuse a finished run or refuse
one of other settings (reading only: nothing is written, no process group starts) → the step count →
open the run (process group, logs, trackers; closed on every exit) → load the policy (full fine-tuning
or LoRA) → preflight → DeepSpeed engine → reference (cache, or live when asked or needed) → resume →
loop (forward, loss, finite checks, backward, step, log, evaluate, checkpoint) → save.

The trainer never asks which loss it has: it reads the loss's declared needs (``requires`` /
``optional``), builds the batch those needs call for (:mod:`dpo_zoo.train.batching`), and reduces the
per-pair losses it gets back: ``mean_i(weight_i · L_i)`` per micro-batch. DeepSpeed averages over
gradient-accumulation steps and ranks, so a step's gradient is the mean over its
``micro_batch_size × gradient_accumulation_steps × world_size`` pairs, whatever their split
(batch 8 × accumulation 1 ≡ batch 1 × accumulation 8).

Data order is a seeded permutation per epoch; the pairs of step ``s`` are positions
``[s·G, (s+1)·G)`` of that order (``G`` = global batch), so a resumed run sees exactly the pairs an
uninterrupted one would, and a random generator for losses that sample (SamPO) is seeded from
``(seed, step, micro-step, rank)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from dpo_zoo.parallel import peers
from dpo_zoo.train.batching import Collated, cache_reference_fields, collate, columns_to_read, loss_wants, pair_batch
from dpo_zoo.config import as_dict, loss_hparams, save_resolved
from dpo_zoo.parallel.process_group import init_distributed, launcher_environment, launcher_world_size, mean_over_ranks
from dpo_zoo.train.engine import build_engine, deepspeed_bf16, forward_precision
from dpo_zoo.train.guards import GradientWatch, OutOfMemoryGuard, stop_agreed, stopped, writer_lock
from dpo_zoo.stopping import GracefulStop
from dpo_zoo.train.health import LiveHealth, reference_shift
from dpo_zoo.errors import CacheError, TrainingError
from dpo_zoo.losses import Loss, LossOutput, Need, build_loss
from dpo_zoo.losses.options import soft_update
from dpo_zoo.train.run_folder import CHECKPOINT_DIR, CONFIG_FILE, FINAL_DIR, LOGS_FILE, finished_run_changes, training_identity
from dpo_zoo.train.saving import clear_previous_run, resume, save_checkpoint, save_final
from dpo_zoo.train.checkpoints import tag_for
from dpo_zoo.model import packing
from dpo_zoo.model.sharded_reference import held_bytes, load_partitioned, lockstep_batches, partitioned_reference_wanted

# ==================================================================== setup


@dataclass
class Run:
    """Where this process stands: distributed rank, device, output folder, loggers (logs.jsonl and
    the trackers of ``train.report_to``, :mod:`dpo_zoo.train.tracking`)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    output_dir: Path
    log_file: Any = None
    trackers: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, record: Dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        if self.trackers is not None:
            self.trackers.log(record)

    def close(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
        if self.trackers is not None:
            self.trackers.close()


@contextlib.contextmanager
def open_run(cfg) -> Iterator[Run]:
    """Join (or start) the process group and open the run folder: the resolved config, the JSONL log
    and the trackers of ``train.report_to`` (on rank 0). They are closed on every exit, error or not."""
    from deepspeed.accelerator import get_accelerator

    from dpo_zoo.train.tracking import open_trackers

    trackers = open_trackers(cfg, as_dict(cfg))  # every rank: a missing tracker package stops them all
    rank, world, local_rank = init_distributed(cfg.train.distributed_timeout_s)
    accelerator = get_accelerator()
    device = torch.device("cpu") if accelerator.device_name() == "cpu" else torch.device(accelerator.device_name(local_rank))
    output_dir = Path(cfg.train.output_dir)
    run = Run(rank=rank, world_size=world, local_rank=local_rank, device=device, output_dir=output_dir)
    lock = contextlib.ExitStack()
    try:
        # One writer per run folder: a second `dpo-zoo train` here is refused, naming the first (every rank).
        lock.enter_context(writer_lock(output_dir, run.is_main, world, command=f"dpo-zoo train ({output_dir})"))
        if run.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, output_dir / CONFIG_FILE)
            run.log_file = open(output_dir / LOGS_FILE, "a", encoding="utf-8")
            run.trackers, trackers = trackers, None
        torch.manual_seed(cfg.train.seed)
        yield run
    finally:
        run.close()
        lock.close()
        if trackers is not None:  # another rank's (unused) trackers
            trackers.close()


def reuse_finished_run(cfg, output_dir: Path, identity: Dict[str, Any]) -> bool:
    """True when ``output_dir`` holds this very run, finished (it is reused); a :class:`TrainingError`
    when it holds a finished run of other settings (``train.overwrite=true`` replaces it instead).
    Reads files only: decided before anything is written or any process group starts."""
    if cfg.train.overwrite:
        return False
    changed = finished_run_changes(output_dir, identity)
    if changed is None:
        return False
    if changed:
        raise TrainingError(
            f"{output_dir} holds a finished run trained with a different {', '.join(changed)}; "
            "set train.overwrite=true to replace it, or choose another train.output_dir"
        )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[dpo-zoo train] {output_dir} is already trained with this config and prepared set; "
              "reusing it (set train.overwrite=true to train again)")
    return True


def count_steps(t, n_pairs: int, world_size: int) -> int:
    """Optimizer steps of the run: ``train.max_steps``, or with ``train.epochs`` the steps that many
    passes over ``n_pairs`` take at ``micro_batch_size × gradient_accumulation_steps × world_size``
    pairs a step. The learning-rate schedule runs over exactly these steps."""
    if not t.epochs:
        return int(t.max_steps)
    global_batch = t.micro_batch_size * t.gradient_accumulation_steps * world_size
    return math.ceil(t.epochs * n_pairs / global_batch)


# ==================================================================== data


def open_prepared(cfg) -> Tuple[Any, Optional[Any]]:
    """The prepared train set and, when present, the held-out set (``<prep.output_dir>/{train,heldout}``)."""
    from dpo_zoo.cache.reader import PreparedSet

    root = Path(cfg.prep.output_dir)
    train_path = root / "train"
    if not (train_path / "manifest.json").exists():
        raise CacheError(
            f"no prepared training set at {train_path}: run `dpo-zoo prep` with the same config first"
        )
    train_set = PreparedSet.open(train_path)
    heldout_path = root / "heldout"
    heldout = PreparedSet.open(heldout_path) if (heldout_path / "manifest.json").exists() else None
    if heldout is not None and len(heldout) == 0:
        heldout = None
    return train_set, heldout


def pair_order(n_pairs: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_pairs, generator=generator)


def micro_batch_indices(n_pairs: int, seed: int, step: int, micro: int, cfg_train, rank: int, world: int) -> List[int]:
    """Dataset indices of one rank's micro-batch: global positions of step ``step`` in the epoch order."""
    size = cfg_train.micro_batch_size
    global_batch = size * cfg_train.gradient_accumulation_steps * world
    first = step * global_batch + (micro * world + rank) * size
    out = []
    for position in range(first, first + size):
        epoch, offset = divmod(position, n_pairs)
        out.append(int(pair_order(n_pairs, seed, epoch)[offset]))
    return out


# ==================================================================== model and reference


def load_policy(cfg, run: Run):
    """(policy, tokenizer, :class:`~dpo_zoo.model.loading.ResolvedModel` it started from)."""
    from dpo_zoo.model.loading import load_model, load_tokenizer, resolve_model

    # Rank 0 resolves first; the others then take the commit it resolved (and a built-in model it converted).
    source = resolve_model(cfg.model) if run.is_main else None
    if run.world_size > 1:
        box = [source.commit if source is not None else None]
        torch.distributed.broadcast_object_list(box, src=0)
        if source is None:
            source = resolve_model(cfg.model, commit=box[0])
    model_path = source.path
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    model = packing.set_attention(load_model(model_path, dtype="float32", trust_remote_code=cfg.model.trust_remote_code),
                                  cfg.model.attention)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.train.lora.enabled:
        from peft import LoraConfig, get_peft_model

        from dpo_zoo.model.loading import peft_wrapping

        lora = cfg.train.lora
        with peft_wrapping():
            adapter = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
            model = get_peft_model(model, adapter)
        if source.from_hub:
            # adapter_config.json then names the base as the Hub knows it (repo and commit), so the
            # adapter loads anywhere with `PeftModel.from_pretrained`, not only beside this snapshot folder.
            adapter_config = model.peft_config["default"]
            adapter_config.base_model_name_or_path = source.name_or_path
            adapter_config.revision = source.commit
        if cfg.train.gradient_checkpointing:
            model.enable_input_require_grads()
    return model, tokenizer, source


def choose_reference(cfg, loss: Loss, train_set) -> str:
    """'cache' or 'live'. ``auto`` takes the cache when it holds every reference field the loss reads."""
    if not loss.needs_reference:
        return "none"
    mode = cfg.train.reference
    if loss.reference_sync is not None:  # a reference that moves (TR-DPO): only a live copy can follow it
        if mode == "cache":
            raise TrainingError(
                f"loss '{loss.name}' updates its reference during training (loss.sync_ref_model=true), so reference "
                "log-probs cannot come from the prepared set; train with train.reference=live (or auto)"
            )
        if cfg.train.lora.enabled:
            raise TrainingError(
                f"loss '{loss.name}' updates its reference during training (loss.sync_ref_model=true), but with LoRA "
                "the reference is the base model under the adapter, not a copy that can move; train without LoRA "
                "or set loss.sync_ref_model=false"
            )
        return "live"
    if not train_set.has_reference and mode != "live":
        raise TrainingError(
            f"loss '{loss.name}' needs reference log-probs ({', '.join(cache_reference_fields(loss))}), which the "
            f"prepared set at {train_set.path} does not hold: it was prepared with prep.reference=false. Prepare "
            "it again with prep.reference=true, or train with train.reference=live."
        )
    missing = missing_from_cache(loss, train_set)
    if mode == "auto":
        return "live" if missing else "cache"
    if mode == "cache" and missing:
        raise TrainingError(
            f"loss '{loss.name}' needs {', '.join(missing)}, which the prepared set at {train_set.path} does "
            f"not hold (it provides: {', '.join(sorted(train_set.provides))}). Prepare with `prep.topk=<k>` "
            "for vocabulary-level losses, or train with `train.reference=live`."
        )
    return mode


def missing_from_cache(loss: Loss, train_set) -> List[str]:
    """The reference needs of ``loss`` that the prepared set cannot serve, as the loss names them."""
    provides = set(train_set.provides)
    missing = []
    for need in sorted(loss.requires & {Need.SEQUENCE_LOGPS, Need.TOKEN_LOGPS, Need.VOCAB_LOGPS}, key=str):
        if need.value not in provides:
            missing.append(need.value)
        elif need is Need.VOCAB_LOGPS and not loss.accepts_topk_reference:
            missing.append("vocab_logps over the whole vocabulary (the cache holds the top-k)")
    return missing


def preflight(cfg, loss: Loss, train_set, policy, tokenizer, source, reference_mode: str) -> None:
    """Refuse runs that cannot be right, before any compute is spent (``source``: the
    :class:`~dpo_zoo.model.loading.ResolvedModel` the policy starts from)."""
    from dpo_zoo.model.loading import tokenizer_fingerprint, weights_fingerprint

    model_path = source.path

    problems = []
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    if trainable == 0:
        problems.append("nothing to train: no parameter of the policy requires a gradient")
    beta = getattr(loss.config, "beta", None)
    if beta is not None and not beta > 0:
        problems.append(f"loss.beta must be > 0, got {beta}")
    key = train_set.key
    tokenizer_hash = tokenizer_fingerprint(tokenizer)
    if key.get("tokenizer") and key["tokenizer"] != tokenizer_hash:
        problems.append(
            f"the prepared set at {train_set.path} was tokenized with another tokenizer "
            f"({str(key['tokenizer'])[:12]}…) than the policy's ({tokenizer_hash[:12]}…): prepare it again "
            "with this model"
        )
    if reference_mode == "cache" and key.get("model_weights"):
        weights = weights_fingerprint(model_path)
        if dict(key["model_weights"]) != weights:
            moved = ""
            if source.from_hub and key.get("model_revision") and key["model_revision"] != source.commit:
                moved = (f" (prepared at commit {str(key['model_revision'])[:12]}; model.revision "
                         f"'{source.revision}' of {source.name_or_path} now resolves to {source.commit[:12]})")
            problems.append(
                f"the reference log-probs at {train_set.path} were computed by another model "
                f"than the policy's initial weights at {model_path}{moved}: prepare again with this model, or "
                "train with `train.reference=live`"
            )
    if problems:
        raise TrainingError("cannot train:\n  - " + "\n  - ".join(problems))


@dataclass
class Reference:
    """Where a run's reference log-probs come from: ``mode`` ``cache`` (the prepared set's rows),
    ``live`` (``model`` runs beside the policy; under LoRA it is the policy itself, run inside
    ``context``, its ``disable_adapter``) or ``none`` (a reference-free loss)."""

    mode: str
    model: Any = None
    context: Any = None
    partitioned: bool = False  # a live model split over the ranks (ZeRO-3): every rank must run it in lockstep

    @property
    def from_rows(self) -> bool:
        """Whether the reference columns of the prepared set are read."""
        return self.mode == "cache"


def build_reference(cfg, policy, model_path: Path, mode: str, device: torch.device, partition: bool = False) -> Reference:
    """The :class:`Reference` of ``mode`` (from :func:`choose_reference`); loads a live reference model
    only when there is no LoRA adapter to switch off, partitioned over the ranks with ``partition``
    (:func:`~dpo_zoo.model.sharded_reference.partitioned_reference_wanted`)."""
    if mode != "live":
        return Reference(mode)
    if cfg.train.lora.enabled:
        # The frozen base weights under the adapter are the reference: no second copy in memory.
        return Reference(mode, policy, policy.disable_adapter)
    if partition:
        model = packing.set_attention(load_partitioned(model_path, cfg.train.precision, cfg.model.trust_remote_code),
                                      cfg.model.attention)
        return Reference(mode, model.requires_grad_(False), partitioned=True)
    from dpo_zoo.model.loading import load_model

    # The reference holds the policy's start weights in the policy's dtype (fp32 under autocast), so at
    # step 0 both forwards are the same computation and the margin starts at 0.
    dtype = "bfloat16" if deepspeed_bf16(cfg) else "float32"
    model = load_model(model_path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    packing.set_attention(model, cfg.model.attention).to(device).eval().requires_grad_(False)
    return Reference(mode, model)


# ==================================================================== the loop


def _micro_generator(loss: Loss, run: Run, seed: int, step: int, micro: int) -> Optional[torch.Generator]:
    if Need.GENERATOR not in loss_wants(loss):
        return None
    generator = torch.Generator(device=run.device)
    generator.manual_seed((seed * 1_000_003 + step) * 65_537 + micro * 257 + run.rank)
    return generator


def reduce_losses(output: LossOutput, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """The micro-batch loss: ``mean_i(w_i · L_i)`` (w = 1 when the data has no weights)."""
    losses = output.losses
    if weight is not None:
        losses = losses * weight.to(losses.dtype)
    return losses.mean()


def batch_metrics(output: LossOutput, forward, collated: Collated) -> Dict[str, float]:
    """TRL's metric names, plus the loss's own scalar/per-pair metrics and our namespaced extras."""
    chosen_r, rejected_r = output.chosen_rewards.float(), output.rejected_rewards.float()
    metrics = {
        "rewards/chosen": chosen_r.mean().item(),
        "rewards/rejected": rejected_r.mean().item(),
        "rewards/accuracies": (chosen_r > rejected_r).float().mean().item(),
        "rewards/margins": (chosen_r - rejected_r).mean().item(),
        "logps/chosen": forward.policy_chosen.sums().detach().float().mean().item(),
        "logps/rejected": forward.policy_rejected.sums().detach().float().mean().item(),
        "len/chosen": forward.policy_chosen.mask.sum(-1).float().mean().item(),
        "len/rejected": forward.policy_rejected.mask.sum(-1).float().mean().item(),
        **reference_shift(forward),  # log π − log π_ref of each side (the doctor's logps_both_falling)
    }
    if forward.policy_chosen.logits_mean is not None:
        metrics["logits/chosen"] = forward.policy_chosen.logits_mean.float().mean().item()
        metrics["logits/rejected"] = forward.policy_rejected.logits_mean.float().mean().item()
    if "is_tie" in collated.per_pair:
        metrics["rewards/ties"] = collated.per_pair["is_tie"].float().mean().item()
    for name, value in output.metrics.items():
        if isinstance(value, torch.Tensor) and value.dim() <= 1 and value.numel() > 0:
            metrics[name if "/" in name else f"loss/{name}"] = value.detach().float().mean().item()
    return metrics


def evaluate(engine, loss: Loss, dataset, cfg, run: Run, pad_id: int, reference: Reference) -> Dict[str, float]:
    """Loss and metrics over the whole held-out set (each rank a slice), ``eval_``-prefixed."""
    module = engine.module
    was_training = module.training
    module.eval()
    size = cfg.train.micro_batch_size
    lockstep = run.world_size > 1 and (engine.zero_optimization_stage() == 3 or reference.partitioned)
    schedule = lockstep_batches(len(dataset), size, run.rank, run.world_size, lockstep)
    columns = columns_to_read(dataset.columns, reference_from_rows=reference.from_rows)
    sums: Dict[str, float] = {}
    count = 0.0
    precision = forward_precision(cfg, run.device)
    with torch.no_grad():
        for start, counted in schedule:
            indices = list(range(start, min(start + size, len(dataset))))
            collated = collate(dataset.rows(indices, columns), pad_id).to(run.device)
            generator = _micro_generator(loss, run, cfg.train.seed, -1, start)  # fixed draws: a stable eval
            with precision():
                forward = pair_batch(loss, module, collated, reference_model=reference.model,
                                     reference_context=reference.context, generator=generator,
                                     padding_free=cfg.model.padding_free)
                if not counted:  # a lockstep re-run (ZeRO-3): only its parameter gathers were needed
                    continue
                output = loss(forward.batch)
            metrics = batch_metrics(output, forward, collated)
            metrics["loss"] = reduce_losses(output, collated.per_pair.get("weight")).item()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * len(indices)
            count += len(indices)
    if run.world_size > 1:
        keys = sorted(set(sums) | {"loss"})
        tensor = torch.tensor([sums.get(k, 0.0) for k in keys] + [count], dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        sums, count = dict(zip(keys, tensor[:-1].tolist())), tensor[-1].item()
    if was_training:
        module.train()
    return {f"eval_{k}": v / max(count, 1) for k, v in sums.items()}


def train(cfg) -> Path:
    """Train ``cfg.loss`` on the prepared set of ``cfg.prep.output_dir``; returns the final model folder."""
    from tqdm.auto import tqdm

    # ---- decide (reading only: a missing prepared set, a finished run to reuse or one of other
    #      settings to refuse are settled before anything is written or any process group starts)
    train_set, heldout = open_prepared(cfg)
    name, hparams = loss_hparams(cfg)
    loss = build_loss(name, **hparams)
    identity = training_identity(as_dict(cfg), train_set.key)
    final_dir = Path(cfg.train.output_dir) / FINAL_DIR
    if reuse_finished_run(cfg, final_dir.parent, identity):
        return final_dir
    t = cfg.train
    max_steps = count_steps(t, len(train_set), launcher_world_size())

    with contextlib.ExitStack() as resources:  # every exit path closes what was opened
        # A peer lost on the way (a collective fails) is a TrainingError naming its rank and the last checkpoint.
        resources.enter_context(peers.lost_peer_as_error(Path(t.output_dir) / CHECKPOINT_DIR))
        # ---- setup: run folder, policy, engine, reference, resume. DeepSpeed reads the launcher's
        # variables while the engine lives (ZeRO-3 on every forward); a plain `python` run gets them
        # for this block only.
        resources.enter_context(launcher_environment())
        run = resources.enter_context(open_run(cfg))
        if t.overwrite:
            clear_previous_run(run)
        policy, tokenizer, source = load_policy(cfg, run)
        reference_mode = choose_reference(cfg, loss, train_set)
        preflight(cfg, loss, train_set, policy, tokenizer, source, reference_mode)
        engine = build_engine(cfg, policy, run.world_size, max_steps)
        resources.callback(engine.destroy)
        partition = partitioned_reference_wanted(engine.zero_optimization_stage(), run.world_size,
                                                 t.lora.enabled, loss.reference_sync is not None)
        reference = build_reference(cfg, engine.module, source.path, reference_mode, run.device, partition)
        watch = resources.enter_context(GradientWatch(engine.module.parameters()))
        sync = loss.reference_sync  # a reference that moves (TR-DPO): updated after its steps, saved with checkpoints
        moving_reference = reference.model if sync is not None else None
        start_step = resume(engine, run, cfg, identity, moving_reference)
        if run.is_main:
            print(
                f"[dpo-zoo train] loss={name} {hparams} | reference={reference_mode} | "
                f"pairs={len(train_set)} | steps {start_step}->{max_steps} | world={run.world_size} | "
                f"zero={engine.zero_optimization_stage()} | lora={t.lora.enabled} | out={run.output_dir}"
            )
            if reference.partitioned:
                held, full = held_bytes(reference.model)
                print(f"[dpo-zoo train] live reference partitioned (ZeRO-3): rank 0 holds {held:,} of its "
                      f"{full:,} parameter bytes", flush=True)
            run.log({"event": "start", "step": start_step, "loss_name": name, "reference": reference_mode})
        health = LiveHealth.start(cfg, loss, run, max_steps, start_step, train_set, tokenizer)  # dpo_zoo/train/health.py

        # ---- loop
        pad_id = tokenizer.pad_token_id
        columns = columns_to_read(train_set.columns, reference_from_rows=reference.from_rows)
        engine.module.train()
        bar = resources.enter_context(
            tqdm(total=max_steps, initial=start_step, desc=f"train {name}", disable=not (run.is_main and t.progress)))
        last_metrics: Dict[str, float] = {}
        checkpoint_root = Path(t.output_dir) / CHECKPOINT_DIR
        stop = resources.enter_context(GracefulStop("train", t.stop_grace_s, resume_hint="run the same command "
                                                    "again to resume from there"))
        memory = resources.enter_context(OutOfMemoryGuard(t, checkpoint_root))
        precision = forward_precision(cfg, run.device)
        for step in range(start_step, max_steps):
            memory.step = step
            last_metrics = train_step(engine, loss, train_set, columns, reference, watch, run, t, pad_id, step,
                                      padding_free=cfg.model.padding_free,
                                      precision=precision)
            done = step + 1
            if sync is not None and sync.due(done):
                soft_update(moving_reference, engine.module, sync.alpha)
            if t.log_every and (done % t.log_every == 0 or done == max_steps):
                health.log_and_check({"step": done, **last_metrics})  # run.log, then the live checks
            bar.update(1)
            bar.set_postfix(loss=f"{last_metrics['loss']:.4f}", acc=f"{last_metrics['rewards/accuracies']:.2f}",
                            tok_s=f"{last_metrics['tokens_per_second']:.0f}")
            if heldout is not None and t.eval_every and done % t.eval_every == 0 and done < max_steps:
                run.log({"step": done, **evaluate(engine, loss, heldout, cfg, run, pad_id, reference)})
            saved = bool(t.save_every and done % t.save_every == 0 and done < max_steps)
            if saved:
                save_checkpoint(engine, run, done, identity, keep=t.keep_checkpoints, moving_reference=moving_reference)
            if done < max_steps and stop_agreed(stop, run.world_size):  # SIGTERM/SIGINT: save this step, then stop
                if not saved:
                    save_checkpoint(engine, run, done, identity, keep=t.keep_checkpoints, moving_reference=moving_reference)
                raise stopped(stop, done, max_steps, checkpoint_root / tag_for(done))

        # ---- evaluate and save
        eval_metrics = evaluate(engine, loss, heldout, cfg, run, pad_id, reference) if heldout is not None else {}
        if eval_metrics:
            run.log({"step": max_steps, **eval_metrics})
        save_final(engine, tokenizer, cfg, run, train_set, source, reference_mode, {**last_metrics, **eval_metrics})
    return final_dir


def train_step(engine, loss: Loss, train_set, columns: List[str], reference: Reference, watch: GradientWatch,
               run: Run, t, pad_id: int, step: int, padding_free: bool = True,
               precision: Callable[[], Any] = contextlib.nullcontext) -> Dict[str, float]:
    """One optimizer step (0-based ``step``): per micro-batch the forward pass and the loss (inside
    ``precision()``, :func:`~dpo_zoo.train.engine.forward_precision`), the finite
    checks and the backward pass, then DeepSpeed's update. Returns the step's metrics, averaged over
    micro-batches and ranks. A non-finite loss or gradient stops the run before the update."""
    started = time.perf_counter()
    step_metrics: Dict[str, float] = {}
    tokens = 0
    for micro in range(t.gradient_accumulation_steps):
        indices = micro_batch_indices(len(train_set), t.seed, step, micro, t, run.rank, run.world_size)
        collated = collate(train_set.rows(indices, columns), pad_id).to(run.device)
        with precision():
            forward = pair_batch(
                loss, engine, collated,
                reference_model=reference.model, reference_context=reference.context,
                generator=_micro_generator(loss, run, t.seed, step, micro), padding_free=padding_free,
            )
            output = loss(forward.batch)
        micro_loss = reduce_losses(output, collated.per_pair.get("weight"))
        if not torch.isfinite(micro_loss):
            raise TrainingError(
                f"non-finite loss ({micro_loss.item()}) at step {step}, micro-batch {micro}, rank {run.rank}; "
                f"pair ids: {collated.ids}. Nothing from this step was applied."
            )
        engine.backward(micro_loss)
        if not watch.check():
            raise TrainingError(
                f"non-finite gradient at step {step}, micro-batch {micro}, rank {run.rank}; "
                f"pair ids: {collated.ids}. Nothing from this step was applied."
            )
        metrics = batch_metrics(output, forward, collated)
        metrics["loss"] = micro_loss.item()
        for k, v in metrics.items():
            step_metrics[k] = step_metrics.get(k, 0.0) + v / t.gradient_accumulation_steps
        tokens += collated.n_tokens
        if engine.is_gradient_accumulation_boundary():
            # Read before the step: the rate this step uses, and (ZeRO-0 records no norm) the
            # pre-clipping gradient norm while the gradients still exist.
            learning_rate = engine.get_lr()[0]
            own_norm = _grad_norm(engine) if engine.zero_optimization_stage() == 0 else None
        engine.step()
    elapsed = time.perf_counter() - started
    step_metrics = mean_over_ranks(step_metrics, run.world_size)
    step_metrics["grad_norm"] = own_norm if own_norm is not None else float(engine.get_global_grad_norm())
    step_metrics["learning_rate"] = learning_rate
    step_metrics["tokens_per_second"] = tokens * run.world_size / max(elapsed, 1e-9)
    return step_metrics

def _grad_norm(engine) -> float:
    """L2 norm of all gradients (ZeRO-0 keeps them on the parameters), summed over ranks' replicas
    identically since DeepSpeed has already averaged them: ‖g‖ = √(Σ_p ‖g_p‖²).

    Each tensor's norm is taken in one fused pass in float32 (``torch.linalg.vector_norm`` accumulates
    blockwise, relative error ~1e-6, far below what a logged norm needs); only the per-tensor norms are
    combined in float64. Copying every gradient to float64 first, as this once did, cost 14% of an fp32
    step of SmolLM2-135M on 2 CPU threads in ``pow`` alone (bench/train_throughput.py --profile)."""
    grads = [p.grad.detach() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    norms = [torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)).double() for g in grads]
    return math.sqrt(float(torch.stack(norms).square().sum().cpu()))
