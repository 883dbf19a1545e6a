"""Experiment trackers: the metrics training writes to metrics.jsonl, also sent to TensorBoard, Weights & Biases or
MLflow (`train.loggers`), each through its own library and in its own offline mode.

`jsonl` (metrics.jsonl) is always written: resuming and tests read it. `png` draws loss.png at the end. The others
are optional extras, imported only when named; `check_loggers` fails before anything is written when one is not
installed. Only rank 0 logs (MetricsLog is enabled there alone).

A resumed run continues the same curves: TensorBoard is told to drop what the lost steps wrote (`purge_step`), and
the trackers that cannot forget (wandb, MLflow) skip steps they already hold, so no step appears twice.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

from llmctl.errors import ConfigError

LOGGERS = ("jsonl", "png", "tensorboard", "wandb", "mlflow")
SCALARS = ("loss", "val_loss", "val_accuracy", "lr", "grad_norm", "tokens_per_s")
"""The metrics.jsonl fields sent to trackers, under the same names."""

_EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
"""Logger -> (module that must be importable, llmctl extra that installs it)."""
_STATE_FILE = "trackers.json"  # in the run directory: the wandb and MLflow run ids, so that a resume continues them


def check_loggers(names: list[str]) -> None:
    """Fail at once, before training writes anything, when a chosen logger's package is not installed."""
    for name in names:
        module, extra = _EXTRAS.get(name, (None, None))
        if module is None:
            continue
        try:
            importlib.import_module(module)  # imported, not just found: a broken install fails here too
        except ImportError:
            raise ConfigError(
                f"train.loggers: {name} needs the {module} package: pip install 'llmctl[{extra}]' "
                f"(or drop {name} from train.loggers)"
            ) from None


class Trackers:
    """The chosen trackers of one run, fed the same records as metrics.jsonl."""

    def __init__(self, names: list[str], out_dir: Path, config: dict[str, Any], resume_step: int | None,
                 logged_until: int):
        check_loggers(names)
        self.out_dir = out_dir
        self.resume_step = resume_step
        self.logged_until = logged_until if resume_step is not None else -1
        state = _read_state(out_dir) if resume_step is not None else {}
        self.writers: list[Any] = []
        if "tensorboard" in names:
            self.writers.append(_TensorBoard(out_dir, config, resume_step))
        if "wandb" in names:
            self.writers.append(_Wandb(out_dir, config, state.get("wandb_id")))
        if "mlflow" in names:
            self.writers.append(_MLflow(out_dir, config, state.get("mlflow_run_id")))
        ids = {k: v for w in self.writers for k, v in w.ids().items()}
        if ids:
            from llmctl.core.files import atomic_write_text

            atomic_write_text(out_dir / _STATE_FILE, json.dumps(ids, indent=2) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        scalars = {k: float(record[k]) for k in SCALARS if record.get(k) is not None}
        if step is None or not scalars:
            return
        for writer in self.writers:
            if writer.rewinds or step > self.logged_until:
                writer.log(int(step), scalars)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """`section.key -> value` with lists and nulls as text: what hyperparameter tables take."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def _read_state(out_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((out_dir / _STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


class _TensorBoard:
    """torch.utils.tensorboard's SummaryWriter, writing event files to RUN/tensorboard (`tensorboard --logdir`)."""

    rewinds = True  # purge_step makes TensorBoard drop the events of steps a resumed run redoes

    def __init__(self, out_dir: Path, config: dict[str, Any], resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=purge)
        if resume_step is None:
            # The resolved config in the HPARAMS tab (on the run's own event file, not a sub-run as add_hparams
            # would make) and, readable as YAML, in the TEXT tab.
            for summary in hparams(flat_config(config), {"val_loss": float("nan")}):
                self.writer.file_writer.add_summary(summary)
            import yaml

            text = yaml.safe_dump(config, sort_keys=False)
            self.writer.add_text("config", "```\n" + text + "```", 0)

    def ids(self) -> dict[str, str]:
        return {}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # tail-able, and nothing lost on a kill

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """Weights & Biases, offline unless WANDB_MODE says otherwise (`wandb sync RUN/wandb/offline-run-*` uploads
    later); files go to RUN/wandb."""

    rewinds = False

    def __init__(self, out_dir: Path, config: dict[str, Any], run_id: str | None):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")  # its banner would otherwise reach the terminal
        mode = os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "llmctl", name=out_dir.name, dir=str(out_dir),
            config=config, mode=mode, id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run.define_metric("*", step_metric="step")

    def ids(self) -> dict[str, str]:
        return {"wandb_id": self.run.id}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({"step": step, **scalars})

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    """MLflow: a local file store in RUN/mlruns unless MLFLOW_TRACKING_URI names a server (`mlflow ui
    --backend-store-uri RUN/mlruns`)."""

    rewinds = False

    def __init__(self, out_dir: Path, config: dict[str, Any], run_id: str | None):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps the file store working but asks for consent: it needs no database packages or server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (out_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "llmctl"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=out_dir.name).info.run_id
            params = flat_config(config)
            from mlflow.entities import Param

            batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(batch), 100):  # the store takes at most 100 params per call
                self.client.log_batch(self.run_id, params=batch[i : i + 100])
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")

    def ids(self) -> dict[str, str]:
        return {"mlflow_run_id": self.run_id}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
