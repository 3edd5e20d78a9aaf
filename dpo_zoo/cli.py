"""The ``dpo-zoo`` command.

    dpo-zoo losses [--json]                          the registry: names, papers, needs, defaults
    dpo-zoo prep CONFIG.yaml [key=value ...] [--verify]
    dpo-zoo train CONFIG.yaml [loss=<name>] [loss.beta=0.05] [key=value ...]
    dpo-zoo compare RUN [RUN ...] --data PREPARED [--losses all] [--output DIR]
    dpo-zoo study STUDY.yaml [key=value ...]         losses x strengths x seeds: the reward-KL frontier
    dpo-zoo doctor RUN_OR_PREPARED_SET [--no-sample] [--config ...]   health checks (exit 1 on a finding)

Also runnable as ``python -m dpo_zoo.cli`` (what the ``deepspeed`` launcher needs:
``deepspeed --num_gpus 2 --module dpo_zoo.cli train CONFIG.yaml``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from dpo_zoo.config import ConfigError, load_config


def _split_overrides(items: List[str]):
    files = [x for x in items if "=" not in x]
    overrides = [x for x in items if "=" in x]
    return files, overrides


def loss_table_rows():
    """One row per registered name: name, family class, paper (arXiv), needs, hyperparameter defaults."""
    from dpo_zoo.losses import describe_needs, registered_losses

    rows = []
    for name, entry in sorted(registered_losses().items()):
        cls = entry.cls
        rows.append(
            {
                "name": name,
                "summary": entry.summary,
                "paper": cls.paper,
                "arxiv": cls.arxiv,
                "needs": describe_needs(entry),
                "defaults": entry.defaults(),
            }
        )
    return rows


def format_loss_table(rows) -> str:
    """The markdown table printed by ``dpo-zoo losses`` (and kept in docs/losses.md)."""

    def fmt(value):
        return f"{value:g}" if isinstance(value, float) else str(value)

    lines = [
        "| name | paper | arXiv | needs | hyperparameters (defaults) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        hparams = ", ".join(f"{k}={fmt(v)}" for k, v in row["defaults"].items())
        lines.append(
            f"| `{row['name']}` | {row['paper']} | {row['arxiv']} | {', '.join(row['needs'])} | {hparams} |"
        )
    return "\n".join(lines)


def cmd_losses(args) -> int:
    rows = loss_table_rows()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(format_loss_table(rows))
        print("\nneeds: sequence_logps = summed log-probs; token_logps = per-token log-probs + masks; "
              "vocab_logps = full-vocabulary log-probs (reference may be top-k from the cache); "
              "[x] = optional.")
    return 0


def cmd_prep(args) -> int:
    from dpo_zoo.cache.prep import run_prep, verify_prepared

    files, overrides = _split_overrides(args.config)
    cfg = load_config(files, overrides)
    if args.verify:
        return verify_prepared(cfg)
    run_prep(cfg)
    return 0


def cmd_train(args) -> int:
    from dpo_zoo.train.trainer import train

    files, overrides = _split_overrides(args.config)
    cfg = load_config(files, overrides)
    train(cfg)
    return 0


def cmd_compare(args) -> int:
    from dpo_zoo.compare.runner import run_compare

    files, overrides = _split_overrides(args.overrides or [])
    cfg = load_config(files, overrides)
    run_compare(
        cfg,
        runs=args.runs,
        data=args.data,
        losses=args.losses,
        output_dir=args.output,
    )
    return 0


def cmd_study(args) -> int:
    from dpo_zoo.study.runner import run_study

    files, overrides = _split_overrides(args.config)
    if len(files) != 1:
        raise ConfigError([f"dpo-zoo study takes one study file, got {len(files)}: {' '.join(files) or 'none'}"])
    run_study(files[0], overrides)
    return 0


def cmd_doctor(args) -> int:
    from dpo_zoo.doctor.runner import run_doctor

    files, overrides = _split_overrides(args.overrides or [])
    findings = run_doctor(args.target, load_config(files, overrides), sample=not args.no_sample)
    return 1 if findings else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-zoo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The deepspeed launcher passes --local_rank before the sub-command; the rank is read from the env.
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("losses", help="list the registered losses")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_losses)

    p = sub.add_parser("prep", help="validate, tokenize and cache reference log-probs")
    p.add_argument("config", nargs="+", help="YAML file(s) then key=value overrides")
    p.add_argument("--verify", action="store_true", help="check an existing prepared set and exit")
    p.set_defaults(func=cmd_prep)

    p = sub.add_parser("train", help="train one loss of the registry")
    p.add_argument("config", nargs="+", help="YAML file(s) then key=value overrides, e.g. loss=sampo")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by deepspeed
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="compare trained runs (or losses) on held-out pairs")
    p.add_argument("runs", nargs="+", help="run folders or model folders (or Hub names org/name)")
    p.add_argument("--data", required=True, help="a prepared held-out set (dpo-zoo prep output)")
    p.add_argument("--losses", default=None, help="'all' or comma-separated loss names: score one model under each")
    p.add_argument("--output", default=None, help="report folder (default: compare.output_dir)")
    p.add_argument("--config", dest="overrides", nargs="*", help="YAML file(s) and key=value overrides")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("study", help="train and evaluate losses x strengths x seeds: the reward-KL frontier")
    p.add_argument("config", nargs="+", help="a study YAML file then key=value overrides (study.* or experiment keys)")
    p.set_defaults(func=cmd_study)
    p = sub.add_parser("doctor", help="health checks of a run folder or a prepared set (dpo_zoo/doctor/runner.py)")
    p.add_argument("target", help="a run folder (train.output_dir), a prepared split, or a prep.output_dir")
    p.add_argument("--no-sample", action="store_true", help="skip the checks that sample from the trained model")
    p.add_argument("--config", dest="overrides", nargs="*", help="YAML file(s) and key=value overrides (train.health.*)")
    p.set_defaults(func=cmd_doctor)
    return parser


def _leave_process_group() -> None:
    """Destroy the process group of a command a launcher started (torchrun, deepspeed), before the
    interpreter exits: left to interpreter teardown, gloo's threads can be destroyed while still
    joinable, which aborts the process ("terminate called without an active exception") after its
    work is done. A command run in-process (``main()`` from Python, no launcher) keeps its one-process
    group, which DeepSpeed's own group registry goes on referring to."""
    if "RANK" not in os.environ or "torch" not in sys.modules:  # not launched, or never joined a group
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"dpo-zoo {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dpo-zoo {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as err:
        # Errors we raise on purpose carry their own clear message (file, row, field); show it plainly.
        from dpo_zoo.errors import USER_ERRORS

        if isinstance(err, USER_ERRORS):
            print(f"dpo-zoo {args.command}: {err}", file=sys.stderr)
            return getattr(err, "exit_code", 2)  # StoppedError: 128 + the signal, as a shell reports it
        raise
    finally:
        _leave_process_group()


def _exit(code: Optional[int]) -> None:
    """Exit ``python -m dpo_zoo.cli`` with ``code``. In a process a launcher started (``RANK`` set), the
    output is flushed and the interpreter's teardown skipped (``os._exit``): even with the process
    group destroyed, a ZeRO-3 run on two CPU processes still aborted there about once in four runs
    ("terminate called without an active exception", exit -6, after its final weights were saved),
    and the launcher then reports the whole run as failed. Everything the command writes is closed
    before ``main`` returns (checkpoints, logs, trackers), so teardown has nothing left to do."""
    code = 0 if code is None else int(code)
    if "RANK" not in os.environ:
        sys.exit(code)
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
