"""`train.loggers`: TensorBoard, wandb (offline) and MLflow (local file store) get the same scalars as
metrics.jsonl, the resolved config as hyperparameters, and a resumed run continues their curves without
duplicated steps."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from llmctl.core import checkpoint as ckpt
from tests.test_train import lm_config, metrics, train_run

SCALARS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s")


def _need(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed (pip install 'llmctl[{module}]')")


def _tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard itself would show: its own reader, purges of resumed runs applied."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _from_jsonl(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for record in metrics(run_dir):
        for key in SCALARS:
            if record.get(key) is not None:
                out.setdefault(key, []).append((record["step"], record[key]))
    return out


def _assert_same_curves(run_dir: Path) -> None:
    board, jsonl = _tensorboard_scalars(run_dir), _from_jsonl(run_dir)
    assert set(board) == set(jsonl) == set(SCALARS)
    for key, points in jsonl.items():
        assert [s for s, _ in board[key]] == [s for s, _ in points], key
        assert [v for _, v in board[key]] == pytest.approx([v for _, v in points], rel=1e-6), key


@_need("tensorboard")
def test_tensorboard_event_file_matches_metrics_jsonl_and_holds_the_config(tmp_path, prepared_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train_run(lm_config(out, prepared_dir, train={"loggers": ["jsonl", "tensorboard"]}))
    _assert_same_curves(out)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert "config" in "".join(acc.Tags()["tensors"])  # the resolved config, as text
    assert not (out / "loss.png").exists()  # png was left out of train.loggers


@_need("tensorboard")
def test_a_resumed_run_continues_the_tensorboard_curves_without_duplicated_steps(tmp_path, prepared_dir):
    out = tmp_path / "run"
    raw = lm_config(out, prepared_dir, train={"loggers": ["tensorboard"], "max_steps": 24, "eval_interval": 8})
    train_run(raw)
    # lose the last checkpoint: the resumed run redoes steps 17-24, which TensorBoard already holds
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    shutil.rmtree(latest)
    raw["train"]["resume"] = True
    result = train_run(raw)
    assert result["resumed_from"].endswith("step-00000016")
    board = _tensorboard_scalars(out)
    steps = [s for s, _ in board["loss"]]
    assert steps == sorted(set(steps)) == [4, 8, 12, 16, 20, 24]
    _assert_same_curves(out)


@_need("wandb")
def test_wandb_offline_run_holds_the_metrics_and_the_config(tmp_path, prepared_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    train_run(lm_config(out, prepared_dir, train={"loggers": ["jsonl", "wandb"]}))
    (run,) = (out / "wandb").glob("offline-run-*")
    # The run's transaction log (what `wandb sync` uploads) holds each history row as protobuf text fields: every
    # logged value, in wandb's own JSON rendering, and the config's keys.
    (log,) = run.glob("run-*.wandb")
    data = log.read_bytes()
    losses = [r["loss"] for r in metrics(out) if r.get("loss") is not None]
    assert len(losses) == 6 and all(json.dumps(v).encode() in data for v in losses)
    assert b"max_steps" in data and b"n_embd" in data and b"tokens_per_s" in data
    assert json.loads((out / "trackers.json").read_text())["wandb_id"]


@_need("mlflow")
def test_mlflow_file_store_matches_metrics_jsonl_and_a_resume_adds_no_step_twice(tmp_path, prepared_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    raw = lm_config(out, prepared_dir, train={"loggers": ["mlflow"]})
    train_run(raw)
    shutil.rmtree(ckpt.latest_checkpoint(out / "checkpoints"))
    raw["train"]["resume"] = True
    train_run(raw)
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run_id = json.loads((out / "trackers.json").read_text())["mlflow_run_id"]
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [s for s, _ in _from_jsonl(out)["loss"]]
    assert [m.value for m in history] == pytest.approx([v for _, v in _from_jsonl(out)["loss"]])
    assert client.get_run(run_id).data.params["train.max_steps"] == "24"


def test_a_logger_whose_package_is_missing_fails_at_once_and_writes_nothing(tmp_path, prepared_dir, llmctl):
    out = tmp_path / "run"
    # a directory named like the package, first on the path, that is not importable as it: find_spec says None
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nclass _Block:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tensorboard' or name.startswith('tensorboard.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    import os

    env = {"PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = llmctl("train", "--set", f"run.out_dir={out}", "--set", f"data.dir={prepared_dir}",
               "--set", "train.loggers=[jsonl,tensorboard]", "--set", "train.max_steps=2", env=env)
    assert r.code == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        "Error: train.loggers: tensorboard needs the tensorboard package: pip install 'llmctl[tensorboard]' "
        "(or drop tensorboard from train.loggers)"
    ]
    assert not out.exists()


def test_an_unknown_logger_is_a_config_error_with_a_suggestion(llmctl):
    r = llmctl("train", "--set", "train.loggers=[tensorbord]", "--print-config")
    assert r.code == 1
    assert "train.loggers: unknown logger 'tensorbord'; did you mean tensorboard?" in r.stderr
