"""One pairwise trainer for every registered loss, on a DeepSpeed engine.

Reads top to bottom (the engine itself is :mod:`dpo_zoo.engine`, the run folder's files
:mod:`dpo_zoo.run_folder`): set up the run → open the prepared sets (the reference cache) → load the policy
(full fine-tuning or LoRA) → preflight → reference (cache, or live when asked or needed) → DeepSpeed
engine → resume → loop (forward, loss, finite checks, backward, step, log, evaluate, checkpoint) → save.

The trainer never asks which loss it has: it reads the loss's declared needs (``requires`` /
``optional``), builds the batch those needs call for (:mod:`dpo_zoo.batching`), and reduces the
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
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from . import checkpoints
from .batching import Collated, cache_reference_fields, collate, columns_to_read, loss_wants, pair_batch
from .config import as_dict, loss_hparams, save_resolved
from .engine import build_engine
from .errors import CacheError, TrainingError
from .losses import Loss, LossOutput, Need, build_loss
from .losses.options import soft_update
from .run_folder import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    FINAL_DIR,
    LOGS_FILE,
    RUN_FILE,
    finished_run_changes,
    identity_changes,
    training_identity,
    write_run_record,
)

# ==================================================================== setup


@dataclass
class Run:
    """Where this process stands: distributed rank, device, output folder, loggers (logs.jsonl and
    the trackers of ``train.report_to``, :mod:`dpo_zoo.tracking`)."""

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> Tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU); a plain `python` run is world 1."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # not under a launcher: a one-process group of our own
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
        )
    if not torch.distributed.is_initialized():
        backend = "gloo" if get_accelerator().device_name() == "cpu" else get_accelerator().communication_backend_name()
        deepspeed.init_distributed(dist_backend=backend)
    return (
        torch.distributed.get_rank(),
        torch.distributed.get_world_size(),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def setup_run(cfg) -> Run:
    from deepspeed.accelerator import get_accelerator

    from .tracking import open_trackers

    trackers = open_trackers(cfg, as_dict(cfg))  # every rank: a missing tracker package stops them all
    rank, world, local_rank = init_distributed()
    accelerator = get_accelerator()
    device = torch.device("cpu") if accelerator.device_name() == "cpu" else torch.device(accelerator.device_name(local_rank))
    output_dir = Path(cfg.train.output_dir)
    run = Run(rank=rank, world_size=world, local_rank=local_rank, device=device, output_dir=output_dir)
    if run.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, output_dir / CONFIG_FILE)
        run.log_file = open(output_dir / LOGS_FILE, "a", encoding="utf-8")
        run.trackers = trackers
    torch.manual_seed(cfg.train.seed)
    return run


# ==================================================================== data


def open_prepared(cfg) -> Tuple[Any, Optional[Any]]:
    """The prepared train set and, when present, the held-out set (``<prep.output_dir>/{train,heldout}``)."""
    from .cache import PreparedSet

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
    """(policy, tokenizer, :class:`~dpo_zoo.models.ResolvedModel` it started from)."""
    from .models import load_model, load_tokenizer, resolve_model

    # Rank 0 resolves first; the others then take the commit it resolved (and a built-in model it converted).
    source = resolve_model(cfg.model) if run.is_main else None
    if run.world_size > 1:
        box = [source.commit if source is not None else None]
        torch.distributed.broadcast_object_list(box, src=0)
        if source is None:
            source = resolve_model(cfg.model, commit=box[0])
    model_path = source.path
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(model_path, dtype="float32", trust_remote_code=cfg.model.trust_remote_code)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.train.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = cfg.train.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
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
    :class:`~dpo_zoo.models.ResolvedModel` the policy starts from)."""
    from .models import tokenizer_fingerprint, weights_fingerprint

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


def build_reference(cfg, policy, model_path: Path, reference_mode: str, run: Run):
    """(reference model, context to run it in) for a live reference; (None, None) with the cache."""
    if reference_mode != "live":
        return None, None
    if cfg.train.lora.enabled:
        # The frozen base weights under the adapter are the reference: no second copy in memory.
        return policy, policy.disable_adapter
    from .models import load_model

    reference = load_model(model_path, dtype=cfg.train.precision, trust_remote_code=cfg.model.trust_remote_code)
    reference.to(run.device).eval().requires_grad_(False)
    return reference, None


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


class GradientWatch:
    """Flags a non-finite gradient of any trainable parameter, checked once per backward.

    Hooks accumulate one boolean on the device (no host sync per parameter); :meth:`check` reads it.
    """

    def __init__(self, params):
        self.finite = None
        self.handles = [p.register_hook(self._hook) for p in params if p.requires_grad]

    def _hook(self, grad):
        ok = torch.isfinite(grad).all()
        self.finite = ok if self.finite is None else self.finite & ok
        return grad

    def check(self) -> bool:
        ok = True if self.finite is None else bool(self.finite.item())
        self.finite = None
        return ok


def _mean_over_ranks(values: Dict[str, float], run: Run) -> Dict[str, float]:
    if run.world_size == 1 or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return {k: v / run.world_size for k, v in zip(keys, tensor.tolist())}


def evaluate(engine, loss: Loss, dataset, cfg, run: Run, pad_id: int, reference=(None, None)) -> Dict[str, float]:
    """Loss and metrics over the whole held-out set (each rank a slice), ``eval_``-prefixed."""
    module = engine.module
    was_training = module.training
    module.eval()
    size = cfg.train.micro_batch_size
    mine = list(range(run.rank * size, len(dataset), run.world_size * size))
    columns = columns_to_read(dataset.columns, reference_from_rows=reference[0] is None and loss.needs_reference)
    sums: Dict[str, float] = {}
    count = 0.0
    with torch.no_grad():
        for start in mine:
            indices = list(range(start, min(start + size, len(dataset))))
            collated = collate(dataset.rows(indices, columns), pad_id).to(run.device)
            generator = _micro_generator(loss, run, cfg.train.seed, -1, start)  # fixed draws: a stable eval
            forward = pair_batch(loss, module, collated, reference_model=reference[0], reference_context=reference[1], generator=generator)
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

    # ---- setup (the prepared set first: a missing one is reported before any process group starts)
    train_set, heldout = open_prepared(cfg)
    name, hparams = loss_hparams(cfg)
    loss = build_loss(name, **hparams)
    run = setup_run(cfg)
    identity = training_identity(as_dict(cfg), train_set.key)
    final_dir = run.output_dir / FINAL_DIR
    if cfg.train.overwrite:
        _clear_previous_run(run)
    elif (changed := finished_run_changes(run.output_dir, identity)) is not None:
        if not changed:
            if run.is_main:
                print(f"[dpo-zoo train] {run.output_dir} is already trained with this config and prepared set; "
                      "reusing it (set train.overwrite=true to train again)")
            run.close()
            return final_dir
        run.close()
        raise TrainingError(
            f"{run.output_dir} holds a finished run trained with a different {', '.join(changed)}; "
            "set train.overwrite=true to replace it, or choose another train.output_dir"
        )

    # ---- data and model
    policy, tokenizer, source = load_policy(cfg, run)
    model_path = source.path
    reference_mode = choose_reference(cfg, loss, train_set)
    preflight(cfg, loss, train_set, policy, tokenizer, source, reference_mode)
    pad_id = tokenizer.pad_token_id

    # ---- engine, reference, resume
    engine = build_engine(cfg, policy, run.world_size)
    reference = build_reference(cfg, engine.module, model_path, reference_mode, run)
    watch = GradientWatch(engine.module.parameters())
    sync = loss.reference_sync  # a reference that moves: updated after its steps, saved with checkpoints
    start_step = _resume(engine, run, cfg, identity, reference[0] if sync is not None else None)
    t = cfg.train
    max_steps = t.max_steps
    if t.epochs:
        global_batch = t.micro_batch_size * t.gradient_accumulation_steps * run.world_size
        max_steps = math.ceil(t.epochs * len(train_set) / global_batch)
    if run.is_main:
        print(
            f"[dpo-zoo train] loss={name} {hparams} | reference={reference_mode} | "
            f"pairs={len(train_set)} | steps {start_step}->{max_steps} | world={run.world_size} | "
            f"zero={engine.zero_optimization_stage()} | lora={t.lora.enabled} | out={run.output_dir}"
        )
        run.log({"event": "start", "step": start_step, "loss_name": name, "reference": reference_mode})

    # ---- loop
    columns = columns_to_read(train_set.columns, reference_from_rows=reference_mode == "cache")
    engine.module.train()
    bar = tqdm(total=max_steps, initial=start_step, desc=f"train {name}", disable=not (run.is_main and t.progress))
    last_metrics: Dict[str, float] = {}
    for step in range(start_step, max_steps):
        started = time.perf_counter()
        step_metrics: Dict[str, float] = {}
        tokens = 0
        for micro in range(t.gradient_accumulation_steps):
            indices = micro_batch_indices(len(train_set), t.seed, step, micro, t, run.rank, run.world_size)
            collated = collate(train_set.rows(indices, columns), pad_id).to(run.device)
            forward = pair_batch(
                loss, engine, collated,
                reference_model=reference[0], reference_context=reference[1],
                generator=_micro_generator(loss, run, t.seed, step, micro),
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
        if sync is not None and sync.due(step + 1):
            soft_update(reference[0], engine.module, sync.alpha)
        elapsed = time.perf_counter() - started
        step_metrics = _mean_over_ranks(step_metrics, run)
        step_metrics["grad_norm"] = own_norm if own_norm is not None else float(engine.get_global_grad_norm())
        step_metrics["learning_rate"] = learning_rate
        step_metrics["tokens_per_second"] = tokens * run.world_size / max(elapsed, 1e-9)
        done = step + 1
        if t.log_every and (done % t.log_every == 0 or done == max_steps):
            run.log({"step": done, **step_metrics})
        last_metrics = step_metrics
        bar.update(1)
        bar.set_postfix(loss=f"{step_metrics['loss']:.4f}", acc=f"{step_metrics['rewards/accuracies']:.2f}",
                        tok_s=f"{step_metrics['tokens_per_second']:.0f}")
        if heldout is not None and t.eval_every and done % t.eval_every == 0 and done < max_steps:
            run.log({"step": done, **evaluate(engine, loss, heldout, cfg, run, pad_id, reference)})
        if t.save_every and done % t.save_every == 0 and done < max_steps:
            _save_checkpoint(engine, run, done, identity, keep=t.keep_checkpoints,
                             moving_reference=reference[0] if sync is not None else None)
    bar.close()

    # ---- evaluate and save
    eval_metrics = evaluate(engine, loss, heldout, cfg, run, pad_id, reference) if heldout is not None else {}
    if eval_metrics:
        run.log({"step": max_steps, **eval_metrics})
    save_final(engine, tokenizer, cfg, run, train_set, source, reference_mode, {**last_metrics, **eval_metrics})
    for handle in watch.handles:
        handle.remove()
    run.close()
    return final_dir


def _grad_norm(engine) -> float:
    """L2 norm of all gradients (ZeRO-0 keeps them on the parameters), summed over ranks' replicas
    identically since DeepSpeed has already averaged them."""
    total = torch.zeros((), dtype=torch.float64)
    for p in engine.module.parameters():
        if p.grad is not None:
            total += p.grad.detach().double().pow(2).sum().cpu()
    return math.sqrt(float(total))


# ==================================================================== checkpoints


def _clear_previous_run(run: Run) -> None:
    """``train.overwrite=true``: drop the checkpoints, final weights and run.json of an earlier run in
    this folder (its logs stay, and this run appends to them), so nothing is resumed or reused."""
    import shutil

    if run.is_main:
        for path in (_checkpoint_root(run), run.output_dir / FINAL_DIR):
            if path.exists():
                shutil.rmtree(path)
        (run.output_dir / RUN_FILE).unlink(missing_ok=True)
    if run.world_size > 1:
        torch.distributed.barrier()


REFERENCE_STATE = "moving_reference"  # the client-state key of a TR-DPO reference in a checkpoint


def _checkpoint_root(run: Run) -> Path:
    return run.output_dir / CHECKPOINT_DIR


def _save_checkpoint(engine, run: Run, step: int, identity: Dict[str, Any], keep: Optional[int] = None,
                     moving_reference=None) -> None:
    """Atomic, checksummed, verified before ``latest`` moves (:mod:`dpo_zoo.checkpoints`). A reference that
    moves during training (TR-DPO) is saved with it, so a resumed run continues from the same reference."""
    extra = {} if moving_reference is None else {REFERENCE_STATE: moving_reference.state_dict()}
    checkpoints.save(engine, _checkpoint_root(run), step, identity, run, keep=keep, extra_state=extra)


def _resume(engine, run: Run, cfg, identity: Dict[str, Any], moving_reference=None) -> int:
    """The step of the newest checkpoint that verifies (damaged ones are reported and skipped), loaded
    into ``engine``; 0 without one."""
    root = _checkpoint_root(run)
    found = checkpoints.newest_verified(root, run) if cfg.train.resume else None
    if found is None:
        return 0
    changed = identity_changes(found.identity, identity)
    if changed:
        raise TrainingError(
            f"the checkpoint {found.folder} was made with a different {', '.join(changed)}: resuming from it would "
            "not give the run this config asks for. Set train.overwrite=true to start over, train.resume=false "
            "to ignore the checkpoint, or choose another train.output_dir"
        )
    state = checkpoints.load(engine, found)
    if moving_reference is not None:
        if REFERENCE_STATE not in state:
            raise TrainingError(f"the checkpoint {found.folder} holds no reference weights, which this run moves "
                                "(loss.sync_ref_model=true); set train.overwrite=true to start over")
        moving_reference.load_state_dict(state[REFERENCE_STATE])
    if run.is_main:
        print(f"[dpo-zoo train] resumed from {found.folder} at step {found.step}")
        run.log({"event": "resume", "step": found.step, "checkpoint": found.tag})
    return found.step


def save_final(engine, tokenizer, cfg, run: Run, train_set, source, reference_mode: str, metrics) -> None:
    """``save_pretrained`` (safetensors; the adapter alone for LoRA), tokenizer, run.json, and the Hub
    model card ``final/README.md`` (:mod:`dpo_zoo.model_card`).

    ``base_model`` is the folder the policy started from; ``base_model_source`` says where that folder
    came from (``name_or_path``, and for a Hub model the ``revision`` asked for and the ``commit`` it
    resolved to), so compare can fetch the same base again on a machine without that folder."""
    final_dir = run.output_dir / FINAL_DIR
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # gathers every partition on rank 0
    else:
        state_dict = module.state_dict() if run.is_main else None
    if run.is_main:
        final_dir.mkdir(parents=True, exist_ok=True)
        module.save_pretrained(final_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(final_dir)
        name, hparams = loss_hparams(cfg)
        record = {
            "loss": name,
            "loss_hparams": hparams,
            "base_model": str(source.path),
            "base_model_source": source.record(),
            "lora": bool(cfg.train.lora.enabled),
            "reference": reference_mode,
            "prepared_set": str(train_set.path),
            "cache_key": train_set.key,
            "metrics": metrics,
            "steps": int(engine.global_steps),
            "train_pairs": len(train_set),
            "world_size": run.world_size,
            "config": as_dict(cfg),
        }
        from .model_card import write_model_card

        write_model_card(final_dir, json.loads(json.dumps(record, default=str)))
        write_run_record(run.output_dir, record)  # last: it marks the run finished
        print(f"[dpo-zoo train] saved {final_dir}")
    if run.world_size > 1:
        torch.distributed.barrier()
