"""Hydra callback for sweeps (`artmaster <stage> -m a=1,2 b=x,y`): one MLflow parent run per
multirun, every job's stage run nested under it, and a summary table of the points.

The parent run opens before the first job and stays active while the jobs run in this process, so
`artmaster.tracking.stage_run` nests each job's run under it. After every job (finished or failed)
the table is rewritten from MLflow: one row per child run, with the parameters that differ between
children and the children's final metrics, as <sweep dir>/summary.csv and summary.md and as
artifacts of the parent run. Registered in conf/config.yaml under `hydra.callbacks`.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from artmaster.files import write_atomic
from artmaster.tracking import SWEEP_KEYS_ENV, describe


class SweepTracking(Callback):
    def __init__(self) -> None:
        self.parent_run_id: str | None = None
        self.sweep_dir: Path | None = None
        self.description = ""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.tracking.get("enabled", True):  # tracking.enabled=false: no parent run either
            return
        import mlflow

        from artmaster.tracking import connect, experiment_id_for

        connect(config)
        self.sweep_dir = Path(config.hydra.sweep.dir)
        task = list(config.hydra.overrides.task)
        overrides = " ".join(task)
        stage = self.stage_name(config)
        run = mlflow.start_run(
            run_name=f"sweep {stage} ({sweep_points(task)} points)",
            experiment_id=experiment_id_for(mlflow, config),
        )
        mlflow.set_tags({"artmaster.sweep": "parent", "sweep_dir": str(self.sweep_dir),
                         "hydra_overrides": overrides[:5000]})
        os.environ[SWEEP_KEYS_ENV] = ",".join(swept_keys(task))  # the jobs' runs are named by these
        self.description = (f"Hydra sweep: `artmaster {stage} -m {overrides}`"[:1000]
                            + f"\n\nOne child run per point, named by its overrides; outputs in `{self.sweep_dir}`.")
        describe(self.description)
        self.parent_run_id = run.info.run_id

    @staticmethod
    def stage_name(config: DictConfig) -> str:
        """`train` for `artmaster train -m ...` (argv[0] "artmaster train", as the cli sets it) and
        for `python -m artmaster.train -m ...` (argv[0] .../artmaster/train.py). Hydra's job name
        would say "config", the file of the shared entry point."""
        return Path(sys.argv[0].split()[-1]).stem if sys.argv and sys.argv[0] else str(config.hydra.job.name)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.parent_run_id is not None:
            self.write_summary()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import mlflow

        if self.parent_run_id is None:
            return
        rows = self.write_summary()
        mlflow.log_metric("sweep_points", len(rows))
        _, markdown = render_summary([{k: v for k, v in row.items() if k != "run_id"} for row in rows])
        describe(f"{self.description}\n\n**Points**\n\n{markdown}")
        mlflow.end_run()
        print(f"sweep: {len(rows)} point(s); summary in {self.sweep_dir / 'summary.md'}")
        self.parent_run_id = None
        os.environ.pop(SWEEP_KEYS_ENV, None)

    def write_summary(self) -> list[dict]:
        import mlflow

        children = mlflow.MlflowClient().search_runs(
            [mlflow.get_run(self.parent_run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}'",
            order_by=["attributes.start_time ASC"],
        )
        rows = summary_rows(children)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        csv_text, markdown = render_summary(rows)
        for name, text in (("summary.csv", csv_text), ("summary.md", markdown)):
            path = self.sweep_dir / name
            write_atomic(path, text)
            mlflow.log_artifact(str(path))
        return rows


def swept_keys(overrides: list[str]) -> list[str]:
    """The keys a sweep varies: `train.optim.lr` of `train.optim.lr=1e-4,2e-4`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o.key_or_group for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()]


def sweep_points(overrides: list[str]) -> int:
    """How many jobs a basic sweep over these overrides runs (the product of the sweep lists)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    points = 1
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            points *= len(list(override.sweep_string_iterator()))
    return points


def summary_rows(children: list) -> list[dict]:
    """One row per child run: the parameters that vary across children, then its headline metrics
    (`result/*`, what the stage's `log_summary` logged, else every metric's latest value)."""
    params = [run.data.params for run in children]
    varying = sorted({k for p in params for k in p if len({q.get(k) for q in params}) > 1})
    rows = []
    for run, run_params in zip(children, params):
        metrics = run.data.metrics
        final = {k: v for k, v in metrics.items() if k.startswith("result/")} or metrics
        rows.append({
            "run": run.info.run_name,
            "status": run.info.status,
            **{k: run_params.get(k, "") for k in varying},
            **dict(sorted(final.items())),
            "run_id": run.info.run_id,
        })
    return rows


def render_summary(rows: list[dict]) -> tuple[str, str]:
    """(CSV, Markdown) of the rows; columns are the union of the rows' keys in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row)) or ["run"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)

    def cell(value: Any) -> str:
        return f"{value:.6g}" if isinstance(value, float) else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return buffer.getvalue(), "\n".join(lines) + "\n"
