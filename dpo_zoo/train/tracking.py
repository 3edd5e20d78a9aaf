"""Where training metrics go besides ``logs.jsonl``: the trackers named by ``train.report_to``.

``logs.jsonl`` is always written (it is what tests, ``compare`` and people's scripts read). On top of
it, ``train.report_to`` names any of

* ``tensorboard`` (the default): event files in ``<output_dir>/tensorboard``;
* ``wandb``: a Weights & Biases run (project ``train.project``, name ``train.run_name``);
* ``mlflow``: an MLflow run in the experiment ``train.project``, at ``MLFLOW_TRACKING_URI``;
* ``trackio``: a Trackio run (project ``train.project``), stored locally under ``TRACKIO_DIR``;

or ``none``. Each is the library's own client, behind an adapter of two calls (``log``, ``close``):
the metric names are the ones ``logs.jsonl`` holds (TRL's: ``loss``, ``rewards/chosen``,
``eval_rewards/accuracies``, ...), at the optimizer step they belong to, and the resolved config is
stored as the run's config or parameters. Every other setting (API keys, offline mode, where files
go) is the library's own environment variable, read by the library: ``WANDB_MODE=offline``,
``WANDB_DIR``, ``MLFLOW_TRACKING_URI``, ``TRACKIO_DIR``, ...

Why not ``accelerate``'s tracker classes: they log through ``accelerate``'s process state
(``PartialState``), which outside an ``Accelerator`` must be created first and then re-derives the
distributed set-up that DeepSpeed already made (on CPU it also resets torch's thread count). The
libraries' own clients need none of that.

Only rank 0 reports. A tracker opens at the first record of a run (so a finished run that is reused
creates no empty tracker run); a tracker whose package is missing is an error before any model
is loaded, naming the extra to install (``pip install 'dpo_zoo[wandb]'``).
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from dpo_zoo.config import report_to_names
from dpo_zoo.errors import TrainingError
from dpo_zoo.train.run_folder import TENSORBOARD_DIR



@dataclass(frozen=True)
class TrackerKind:
    """One value of ``train.report_to``: the package it needs, the extra that installs it, its adapter."""

    name: str
    module: str
    extra: str
    open: Callable[["TrackerRun"], "Tracker"]


@dataclass(frozen=True)
class TrackerRun:
    """What an adapter needs to open its run."""

    output_dir: Path
    project: str
    run_name: str
    config: Dict[str, Any]


class Tracker:
    """The adapter interface: ``log`` finite scalars at a step, then ``close`` once."""

    def log(self, metrics: Dict[str, float], step: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


# ==================================================================== the adapters


class TensorBoardTracker(Tracker):
    def __init__(self, run: TrackerRun):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.output_dir / TENSORBOARD_DIR))

    def log(self, metrics, step):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, run: TrackerRun):
        import wandb

        self.run = wandb.init(project=run.project, name=run.run_name, config=run.config)

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


class MlflowTracker(Tracker):
    """Through ``MlflowClient`` (explicit run id, no process-global active run): a run that stopped
    on an error leaves nothing that makes the next run in the same process fail."""

    def __init__(self, run: TrackerRun):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient()
        experiment = self.client.get_experiment_by_name(run.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(run.project)
        self.run_id = self.client.create_run(experiment_id, run_name=run.run_name).info.run_id
        params = [Param(key, str(value)) for key, value in flatten(run.config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self):
        self.client.set_terminated(self.run_id)


class TrackioTracker(Tracker):
    def __init__(self, run: TrackerRun):
        import trackio

        self.run = trackio.init(project=run.project, name=run.run_name, config=run.config)

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


KINDS: Dict[str, TrackerKind] = {
    kind.name: kind
    for kind in (
        TrackerKind("tensorboard", "tensorboard", "tensorboard", TensorBoardTracker),
        TrackerKind("wandb", "wandb", "wandb", WandbTracker),
        TrackerKind("mlflow", "mlflow", "mlflow", MlflowTracker),
        TrackerKind("trackio", "trackio", "trackio", TrackioTracker),
    )
}


# ==================================================================== the config value


def check_installed(names: Sequence[str]) -> None:
    """Raise :class:`TrainingError` naming the extra to install for the first tracker whose package is absent."""
    for name in names:
        kind = KINDS[name]
        if importlib.util.find_spec(kind.module) is None:
            raise TrainingError(
                f"train.report_to names '{name}', but the {kind.module} package is not installed: "
                f"pip install 'dpo_zoo[{kind.extra}]' (or set train.report_to to the trackers you have)"
            )


def flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"train": {"learning_rate": 1e-6}}`` → ``{"train.learning_rate": 1e-6}`` (lists stay leaves)."""
    out: Dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def scalars(record: Dict[str, Any]) -> Dict[str, float]:
    """The finite numbers of a ``logs.jsonl`` record, without its ``step`` (which is the x-axis)."""
    return {
        key: float(value)
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


# ==================================================================== the set a run reports to


class Trackers:
    """The trackers of one training run. Opened at the first :meth:`log`; closed by :meth:`close`."""

    def __init__(self, names: Sequence[str], run: TrackerRun):
        self.names = list(names)
        self.run = run
        self.open: Optional[List[Tracker]] = None

    def log(self, record: Dict[str, Any]) -> None:
        if self.open is None:
            self.open = []
            for name in self.names:
                try:
                    self.open.append(KINDS[name].open(self.run))
                except Exception as err:  # the library's own message (bad credentials, unreachable store)
                    self.close()
                    raise TrainingError(f"train.report_to: cannot start the {name} run: {err}") from err
        metrics = scalars(record)
        if metrics:
            for tracker in self.open:
                tracker.log(metrics, int(record.get("step", 0)))

    def close(self) -> None:
        for tracker in self.open or []:
            tracker.close()
        self.open = []


def open_trackers(cfg, config: Dict[str, Any]) -> Trackers:
    """The trackers ``cfg.train.report_to`` names, for a run in ``cfg.train.output_dir`` whose resolved
    config is ``config``. Checks that their packages are installed; opens nothing yet."""
    names = report_to_names(_plain(cfg.train.report_to))
    check_installed(names)
    output_dir = Path(cfg.train.output_dir)
    run = TrackerRun(
        output_dir=output_dir,
        project=cfg.train.project,
        run_name=cfg.train.run_name or output_dir.resolve().name,
        config=config,
    )
    return Trackers(names, run)


def _plain(value: Any) -> Any:
    """An OmegaConf list as a plain list (``train.report_to`` may be either)."""
    from omegaconf import ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
