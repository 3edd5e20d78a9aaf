"""The worker side of ``train_throughput.py``: what runs inside each measured subprocess (prep, dpo_zoo's
trainer, TRL's DPOTrainer live or with precomputed reference log-probs) and the clock that stamps each
optimizer step. The orchestration, figures and report stay in ``train_throughput.py``, which starts
these workers (see its docstring for what is measured and why)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional


def memory_mb() -> Dict[str, float]:
    """Current and peak resident set size of this process (``VmRSS``, ``VmHWM``), in MiB."""
    text = Path("/proc/self/status").read_text()
    out = {}
    for key in ("VmRSS", "VmHWM"):
        match = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
        out[key] = round(int(match.group(1)) / 1024, 1) if match else None
    return out


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` value 5); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class StepClock:
    """Per-step records: begin/end wall and CPU stamps, tokens (real and padded), loss.

    Stamps are taken after a device synchronisation on a GPU, so they bound the step's real work.
    """

    def __init__(self, device: str, warmup: int, total: int, profile_to: Optional[str] = None):
        import torch

        self.torch = torch
        self.cuda = device == "cuda"
        self.warmup, self.total = warmup, total
        self.steps: List[Dict[str, Any]] = []
        self.current: Optional[Dict[str, Any]] = None
        self.training_memory: Dict[str, Any] = {}
        self.started = time.perf_counter()
        # Optional torch.profiler over the timed steps (bench/train_throughput.py --profile).
        self.profile_to, self.profiler = profile_to, None

    def _now(self):
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def training_starts(self) -> None:
        """Memory before the first step; from here the peak covers the training steps only."""
        whole = memory_mb()
        self.training_memory = {
            "rss_before_training_mb": whole["VmRSS"],
            "peak_rss_before_training_mb": whole["VmHWM"],
            "peak_reset": reset_peak_rss(),
            "setup_s": round(time.perf_counter() - self.started, 3),
        }
        if self.cuda:
            self.training_memory["gpu_allocated_before_training_mb"] = round(self.torch.cuda.memory_allocated() / 2**20, 1)
            self.training_memory["gpu_peak_before_training_mb"] = round(self.torch.cuda.max_memory_allocated() / 2**20, 1)
            self.torch.cuda.reset_peak_memory_stats()

    def begin(self) -> None:
        if not self.steps and self.current is None:
            self.training_starts()
        if self.profile_to and len(self.steps) == self.warmup and self.profiler is None:
            self.profiler = self.torch.profiler.profile(record_shapes=True)
            self.profiler.__enter__()
        wall, cpu = self._now()
        self.current = {"step": len(self.steps) + 1, "begin_wall": wall, "begin_cpu": cpu, "tokens": 0,
                        "padded_tokens": 0, "sequences": 0, "width": 0}

    def computed(self, positions: int) -> None:
        """Positions a packed forward runs over (the packed row's length)."""
        if self.current is not None:
            self.current["computed_positions"] = self.current.get("computed_positions", 0) + positions

    def batch(self, attention_mask) -> None:
        if self.current is None:
            raise RuntimeError("a batch was seen outside a step")
        self.current["tokens"] += int(attention_mask.sum().item())
        self.current["padded_tokens"] += int(attention_mask.numel())
        self.current["sequences"] += int(attention_mask.shape[0])
        self.current["width"] = max(self.current["width"], int(attention_mask.shape[1]))

    def end(self) -> None:
        wall, cpu = self._now()
        record = self.current
        self.current = None
        record.update(end_wall=wall, end_cpu=cpu, threads=self.torch.get_num_threads(), rss_mb=memory_mb()["VmRSS"],
                      load_average=os.getloadavg()[0])
        self.steps.append(record)
        if self.profiler is not None and len(self.steps) == self.total:
            self.profiler.__exit__(None, None, None)
            table = self.profiler.key_averages(group_by_input_shape=False).table(sort_by="self_cpu_time_total", row_limit=60)
            shapes = self.profiler.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40)
            Path(self.profile_to).write_text(table + "\n\nby input shape:\n" + shapes)
            self.profiler = None
        print(f"[bench] step {record['step']}/{self.total}: {record['tokens']} tokens, "
              f"{wall - record['begin_wall']:.2f} s in step", flush=True)

    def result(self) -> Dict[str, Any]:
        memory = memory_mb()
        out = {"steps": self.steps, **self.training_memory,
               "peak_rss_training_mb": memory["VmHWM"] if self.training_memory.get("peak_reset") else None,
               "peak_rss_mb": max(memory["VmHWM"], self.training_memory.get("peak_rss_before_training_mb") or 0)}
        if self.cuda:
            out["gpu_peak_training_mb"] = round(self.torch.cuda.max_memory_allocated() / 2**20, 1)
            out["gpu_peak_mb"] = max(out["gpu_peak_training_mb"], self.training_memory.get("gpu_peak_before_training_mb", 0))
        return out


def set_threads(spec: Dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(spec["threads"])


def dpo_zoo_overrides(spec: Dict[str, Any]) -> List[str]:
    """The config both dpo_zoo steps (prep and train) read: same data, model and prepared set."""
    fp32 = spec["precision"] == "fp32"
    return [
        f"model.name_or_path={spec['model']}",
        f"data.preprocessor={spec['preprocessor']}",
        f"data.train_path={spec['data']}",
        "data.heldout_fraction=0.0",
        f"data.max_train_pairs={spec['pairs']}",
        "data.on_bad_row=skip",
        f"prep.output_dir={spec['prepared_dir']}",
        f"prep.max_length={spec['max_length']}",
        f"prep.max_prompt_length={spec['max_prompt_length']}",
        f"prep.batch_size={spec['ref_batch']}",
        f"prep.shard_size={max(spec['pairs'], 1)}",
        f"prep.dtype={'float32' if fp32 else 'bfloat16'}",
        "prep.progress=false",
        "loss.name=dpo",
        f"loss.beta={spec['beta']}",
        f"train.seed={spec['seed']}",
        f"train.max_steps={spec['total_steps']}",
        f"train.micro_batch_size={spec['micro_batch']}",
        "train.gradient_accumulation_steps=1",
        f"train.learning_rate={spec['lr']}",
        "train.weight_decay=0.0",
        "train.warmup_steps=0",
        "train.lr_schedule=linear",
        "train.max_grad_norm=1.0",
        f"train.precision={'float32' if fp32 else 'bfloat16'}",
        "train.reference=cache",
        "train.log_every=1",
        "train.eval_every=0",
        "train.save_every=0",
        "train.resume=false",
        "train.overwrite=true",
        "train.progress=false",
        "train.gradient_checkpointing=false",
        "train.lora.enabled=false",
    ]


def worker_prep(spec: Dict[str, Any]) -> Dict[str, Any]:
    set_threads(spec)
    from dpo_zoo.cache.reader import PreparedSet
    from dpo_zoo.config import load_config
    from dpo_zoo.cache.prep import run_prep

    cfg = load_config([], dpo_zoo_overrides(spec))
    wall, cpu = time.perf_counter(), time.process_time()
    paths = run_prep(cfg)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    train = PreparedSet.open(paths["train"])
    rows = train.rows(list(range(len(train))))
    tokens = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    return {"prep_s": round(wall, 3), "prep_cpu_s": round(cpu, 3), "pairs": len(train), "tokens": tokens,
            "peak_rss_mb": memory_mb()["VmHWM"], "path": str(paths["train"]),
            "note": "run_prep end to end: data loading, tokenization, model loading, reference pass, shard and manifest writes"}


def worker_dpo_zoo(spec: Dict[str, Any], padding_free: bool = True, reference: str = "cache") -> Dict[str, Any]:
    set_threads(spec)
    import dpo_zoo.model.logps as L
    import dpo_zoo.train.trainer as T
    from dpo_zoo.config import load_config

    imports_mb = memory_mb()["VmRSS"]
    clock = StepClock(spec["device"], spec["warmup"], spec["total_steps"],
                      profile_to=spec["run_dir"] + ".profile.txt" if spec.get("profile") else None)
    cfg = load_config([], dpo_zoo_overrides(spec) + [f"train.output_dir={spec['run_dir']}",
                                                     f"model.padding_free={str(padding_free).lower()}",
                                                     f"train.reference={reference}"])
    pack_rows = L.packing.pack_rows

    def counted_pack_rows(*args, **kwargs):  # the positions the packed forward really runs over
        row = pack_rows(*args, **kwargs)
        if row is not None:
            clock.computed(row.length)
        return row

    L.packing.pack_rows = counted_pack_rows

    # Hooks from outside the trainer (its code is untouched): a step begins where the trainer picks
    # the batch indices of its first micro-batch and ends when the DeepSpeed engine's step returns.
    pick, collate, build_engine = T.micro_batch_indices, T.collate, T.build_engine

    def timed_pick(n_pairs, seed, step, micro, cfg_train, rank, world):
        if micro == 0:
            clock.begin()
        return pick(n_pairs, seed, step, micro, cfg_train, rank, world)

    def counted_collate(rows, pad_token_id):
        collated = collate(rows, pad_token_id)
        clock.batch(collated.attention_mask)
        return collated

    def timed_engine(*args, **kwargs):
        engine = build_engine(*args, **kwargs)
        engine_step = engine.step

        def step(*args, **kwargs):
            out = engine_step(*args, **kwargs)
            clock.end()
            return out

        engine.step = step
        return engine

    T.micro_batch_indices, T.collate, T.build_engine = timed_pick, counted_collate, timed_engine
    T.train(cfg)
    result = clock.result()
    logged = [json.loads(line) for line in (Path(spec["run_dir"]) / "logs.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in logged if "loss" in r and "event" not in r}
    for record in result["steps"]:
        entry = by_step.get(record["step"], {})
        record["loss"] = entry.get("loss")
        record["logged_tokens_per_second"] = entry.get("tokens_per_second")
    result["rss_after_imports_mb"] = imports_mb
    return result


def trl_dataset(spec: Dict[str, Any]):
    """dpo_zoo's prepared pairs as TRL's tokenized columns, in dpo_zoo's visiting order."""
    import dpo_zoo.train.trainer as T
    from datasets import Dataset
    from dpo_zoo.cache.reader import PreparedSet
    from dpo_zoo.config import load_config

    cfg = load_config([], dpo_zoo_overrides(spec))
    prepared = PreparedSet.open(spec["prepared_path"])
    n = len(prepared)
    order: List[int] = []
    for step in range(spec["total_steps"]):
        order += T.micro_batch_indices(n, cfg.train.seed, step, 0, cfg.train, 0, 1)
    seen = set(order)
    order += [i for i in range(n) if i not in seen]  # the rest: prepared (and precomputed) but not trained on
    columns = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for row in prepared.rows(order, columns=["id", "chosen_input_ids", "rejected_input_ids",
                                            "chosen_completion_start", "rejected_completion_start"]):
        chosen, rejected = list(row["chosen_input_ids"]), list(row["rejected_input_ids"])
        c, r = int(row["chosen_completion_start"]), int(row["rejected_completion_start"])
        if chosen[:c] != rejected[:r]:
            raise SystemExit(f"pair {row['id']}: chosen and rejected prompts differ in tokens; TRL's format needs one "
                             "shared prompt, so this pair cannot be given to TRL as is")
        columns["prompt_ids"].append(chosen[:c])
        columns["chosen_ids"].append(chosen[c:])
        columns["rejected_ids"].append(rejected[r:])
    return Dataset.from_dict(columns), order


def worker_trl(spec: Dict[str, Any], precompute: bool) -> Dict[str, Any]:
    set_threads(spec)
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpo_zoo.model.loading import load_tokenizer, resolve_model_path
    from dpo_zoo.config import load_config

    imports_mb = memory_mb()["VmRSS"]
    clock = StepClock(spec["device"], spec["warmup"], spec["total_steps"],
                      profile_to=spec["run_dir"] + ".profile.txt" if spec.get("profile") else None)
    model_path = str(resolve_model_path(load_config([], dpo_zoo_overrides(spec)).model))
    tokenizer = load_tokenizer(model_path)
    dataset, order = trl_dataset(spec)
    precompute_record: Dict[str, Any] = {}
    losses: List[float] = []

    class PreTokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # Already tokenized (dpo_zoo's ids); TRL 1.16 would tokenize text here, before training.
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            wall, cpu = time.perf_counter(), time.process_time()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            precompute_record[name] = {"s": round(time.perf_counter() - wall, 3),
                                       "cpu_s": round(time.process_time() - cpu, 3),
                                       "pairs": len(dataset), "batch_size": batch_size}
            return out

        def training_step(self, model, inputs, num_items_in_batch=None):
            clock.batch(inputs["attention_mask"])
            loss = super().training_step(model, inputs, num_items_in_batch)
            losses.append(float(loss.detach().float().item()))
            return loss

    class Stamps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.end()

    cuda = spec["device"] == "cuda"
    config = DPOConfig(
        output_dir=spec["run_dir"],
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=1,
        max_steps=spec["total_steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch_fused",  # TRL's default: torch.optim.AdamW(fused=True), as dpo_zoo
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        beta=spec["beta"],
        loss_type=["sigmoid"],
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=spec["ref_batch"],
        max_length=None,  # the ids are already cut to --max-length by dpo_zoo's prep
        pad_to_multiple_of=None,
        padding_free=False,
        gradient_checkpointing=False,
        activation_offloading=False,
        use_liger_kernel=False,
        torch_compile=False,
        bf16=spec["precision"] == "bf16",
        fp16=False,
        use_cpu=not cuda,
        model_init_kwargs={"dtype": torch.float32},
        seed=spec["seed"],
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = PreTokenizedDPOTrainer(model=model_path, args=config, train_dataset=dataset,
                                     processing_class=tokenizer, callbacks=[Stamps()])
    trainer.train()
    result = clock.result()
    for record, loss in zip(result["steps"], losses):
        record["loss"] = loss
    result.update(rss_after_imports_mb=imports_mb, precompute=precompute_record.get("train"),
                  reference_model_in_memory=trainer.ref_model is not None,
                  optimizer=type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__,
                  pair_order=order[: spec["total_steps"] * spec["micro_batch"]])
    return result
