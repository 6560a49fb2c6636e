"""Experiment trackers: Weights & Biases and MLflow get what TensorBoard gets (every step record's scalars,
the images a job logs), plus the resolved config. Rank 0 only: the MetricsLogger holds them.

    trackers = build_trackers(cfg, out, resolved_config, resuming=start_step > 0)
    MetricsLogger(..., trackers=trackers)

Each tracker's run id is kept in ``<output_dir>/trackers.json``; a run resumed from a checkpoint
continues the same tracker run (W&B ``resume="allow"`` with the stored id, MLflow the stored run id),
a run started from step 0 opens a new one. Steps logged again after a kill (those between the last
checkpoint and the kill) are sent again: MLflow keeps both values in the metric's history, W&B's resume
handling decides what its server keeps (metrics.jsonl and TensorBoard keep the later).
Both packages are optional extras (``pip install -e ".[wandb]"`` / ``".[mlflow]"``).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List

from ..config import Config
from ..errors import UserError

__all__ = ["WandbTracker", "MlflowTracker", "build_trackers", "check_tracker_packages", "TRACKERS_FILE"]

TRACKERS_FILE = "trackers.json"


def _missing(module: str, key: str) -> UserError:
    return UserError(f"config key 'logging.{key}.enabled' = true needs the {module} package: "
                        f"pip install -e \".[{key}]\" (or pip install {module}), or set logging.{key}.enabled=false")


def _import_extra(module: str, key: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise _missing(module, key) from None


def check_tracker_packages(cfg: Config) -> None:
    """Before any heavy work: every enabled tracker's package is installed (UserError naming the extra)."""
    for key in ("wandb", "mlflow"):
        if getattr(cfg.logging, key).enabled and importlib.util.find_spec(key) is None:
            raise _missing(key, key)


def _read_ids(out: Path) -> Dict[str, str]:
    try:
        return json.loads((out / TRACKERS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _store_id(out: Path, name: str, run_id: str) -> None:
    ids = _read_ids(out)
    ids[name] = run_id
    tmp = out / f".{TRACKERS_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(ids, indent=2) + "\n")
    os.replace(tmp, out / TRACKERS_FILE)


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


class WandbTracker:
    def __init__(self, cfg: Config, out: Path, resolved: Dict[str, Any], resuming: bool):
        self.wandb = _import_extra("wandb", "wandb")
        w = cfg.logging.wandb
        run_id = _read_ids(out).get("wandb") if resuming else None
        try:
            self.run = self.wandb.init(project=w.project, entity=w.entity, name=w.name or cfg.name, mode=w.mode,
                                       dir=str(out), config=resolved, id=run_id,
                                       resume="allow" if run_id else None)
        except self.wandb.errors.Error as e:  # e.g. online without a login
            raise UserError(f"logging.wandb: wandb.init failed: {e}; run `wandb login`, or set "
                            f"logging.wandb.mode=offline") from None
        _store_id(out, "wandb", self.run.id)

    def log_scalars(self, scalars: Dict[str, float], step: int) -> None:
        if scalars:
            self.run.log(dict(scalars), step=step)

    def log_image(self, tag: str, image, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    def __init__(self, cfg: Config, out: Path, resolved: Dict[str, Any], resuming: bool):
        _import_extra("mlflow", "mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        self._metric = Metric
        m = cfg.logging.mlflow
        # MLflow 3 refuses new file stores (./mlruns) unless MLFLOW_ALLOW_FILE_STORE is set and recommends a
        # database backend: a SQLite file in the output dir, with the artifacts beside it.
        uri = m.tracking_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        run_id = _read_ids(out).get("mlflow") if resuming else None
        try:
            self.client = MlflowClient(tracking_uri=uri)
            if run_id is not None:
                self.client.get_run(run_id)  # raises if the store does not hold it
                self.client.update_run(run_id, status="RUNNING")
            else:
                exp = self.client.get_experiment_by_name(m.experiment)
                if exp is not None:
                    exp_id = exp.experiment_id
                else:
                    location = (out / "mlartifacts").resolve().as_uri() if m.tracking_uri is None else None
                    exp_id = self.client.create_experiment(m.experiment, artifact_location=location)
                run_id = self.client.create_run(exp_id, run_name=m.run_name or cfg.name).info.run_id
                params = [Param(k, json.dumps(v)[:6000]) for k, v in _flatten(resolved).items()]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                    self.client.log_batch(run_id, params=params[i:i + 100])
            self.client.log_dict(run_id, resolved, "config.json")
        except MlflowException as e:
            raise UserError(f"logging.mlflow (tracking URI {uri}): {e.message}") from None
        self.run_id = run_id
        _store_id(out, "mlflow", run_id)

    def log_scalars(self, scalars: Dict[str, float], step: int) -> None:
        if scalars:
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[self._metric(k, float(v), now, step)
                                                        for k, v in scalars.items()])

    def log_image(self, tag: str, image, step: int) -> None:
        self.client.log_image(self.run_id, image, artifact_file=f"{tag}/step_{step:08d}.png")

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def build_trackers(cfg: Config, out: Path, resolved: Dict[str, Any], resuming: bool) -> List[Any]:
    """The trackers logging.wandb / logging.mlflow turn on (rank 0 calls this)."""
    trackers: List[Any] = []
    if cfg.logging.wandb.enabled:
        trackers.append(WandbTracker(cfg, out, resolved, resuming))
    if cfg.logging.mlflow.enabled:
        trackers.append(MlflowTracker(cfg, out, resolved, resuming))
    return trackers
