"""MLflow for a study: one parent run per study, a nested run per stage, one run per evaluated policy.

Only the driver talks to MLflow (Ray workers report to Ray; the driver logs what they reported),
so a sqlite store never sees concurrent writers and a cluster's workers need no MLflow access.

Every run carries a tag ``mpq.key`` that names what it records (``study``, ``stage/search``,
``policy/finetune/<policy_id>/lr=0.01`` ...). Before creating a run we look that key up; a
finished run is left alone and an unfinished one (the study was killed) is reused, so resuming a
study never duplicates runs.

Where MLflow lives: ``tracking.uri`` in the config, else ``$MLFLOW_TRACKING_URI``, else a sqlite
store inside the study directory. An unreachable server fails the study at once with one line, or,
with ``tracking.on_unreachable: continue``, the study goes on with Parquet as its record.
"""
from __future__ import annotations

import functools
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from .errors import UserError
from .paths import StudyPaths

log = logging.getLogger(__name__)
KEY = "mpq.key"
STUDY = "mpq.study"


def resolve_uri(configured: str | None, paths: StudyPaths) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or paths.mlflow_uri


def check_reachable(uri: str, timeout: float = 2.5) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            if r.status != 200:
                raise UserError(f"MLflow tracking server {uri} answered {r.status} on /health")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"MLflow tracking server {uri} is unreachable ({reason})") from None


# MLflow's client retries a failed request 7 times with exponential back-off (minutes), then raises. A
# study should notice a dead server within seconds; users who need patience set these themselves.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                 # MLflow prints "View run ... at" to stdout for every run ended on a server.
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def _lost_errors() -> tuple[type[BaseException], ...]:
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    return MlflowException, RequestException, OSError


def _timed(fn):
    """Accumulate the wall time spent talking to MLflow (the study reports it as overhead), and turn a
    store that stops answering into ``Tracker.lost`` (one line, not a traceback)."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        except _lost_errors() as e:
            if self.enabled:  # else an outer call of a nested pair has reported it already
                self.lost(e)
            return None
        finally:
            self.seconds += time.perf_counter() - t0
    return wrapper


class Tracker:
    """Idempotent run bookkeeping over MlflowClient. ``Tracker.disabled()`` does nothing."""

    def __init__(self, uri: str | None, experiment: str, study_id: str, artifact_root: Path | None = None,
                 on_unreachable: str = "fail", echo: Callable[[str], None] | None = None):
        self.seconds = 0.0
        t0 = time.perf_counter()
        self.enabled = uri is not None
        self.study_id = study_id
        self.uri = uri
        self.on_unreachable = on_unreachable
        self.echo = echo or (lambda msg: log.warning("%s", msg))
        if not self.enabled:
            return
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = artifact_root.as_uri() if artifact_root is not None and uri.startswith("sqlite") else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        self.seconds += time.perf_counter() - t0

    @classmethod
    def disabled(cls, study_id: str = "") -> Tracker:
        return cls(None, "", study_id)

    def lost(self, err: BaseException) -> None:
        """The store stopped answering mid-study: stop using it. ``continue``: say so once and go on
        with Parquet as the record (the next run backfills); ``fail``: one UserError."""
        from .diskspace import disk_full

        if disk_full(err) is not None:
            raise err  # not MLflow's fault: the disk under its store is full (the CLI says so)
        self.enabled = False
        why = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        if self.on_unreachable == "continue":
            self.echo(f"[mlflow] {self.uri} stopped answering ({why}); continuing with Parquet as the record; "
                      "the next run with MLflow reachable backfills it")
            return
        raise UserError(f"MLflow tracking at {self.uri} stopped answering ({why}); every finished result is in "
                        "Parquet: rerun the study when MLflow is back (or set tracking.on_unreachable=continue)")

    # ------------------------------------------------------------------ runs
    @_timed
    def find(self, key: str):
        if not self.enabled:
            return None
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{STUDY}` = '{self.study_id}' and tags.`{KEY}` = '{key}'",
            max_results=5,
        )
        return runs[0] if runs else None

    @_timed
    def run(self, key: str, name: str, parent: str | None = None, tags: Mapping[str, str] | None = None) -> str | None:
        """The id of the run recording ``key``: the existing one or a new one (status RUNNING)."""
        if not self.enabled:
            return None
        found = self.find(key)
        if not self.enabled:
            return None
        if found is not None:
            if found.info.status != "RUNNING" and found.info.status != "FINISHED":
                self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        all_tags = {KEY: key, STUDY: self.study_id, **(tags or {})}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        return self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id

    @_timed
    def is_finished(self, key: str) -> bool:
        found = self.find(key)
        return found is not None and found.info.status == "FINISHED"

    @_timed
    def finish(self, run_id: str | None, status: str = "FINISHED") -> None:
        if self.enabled and run_id:
            self.client.set_terminated(run_id, status=status)

    # --------------------------------------------------------------- logging
    @_timed
    def log_params(self, run_id: str | None, params: Mapping[str, object]) -> None:
        if not (self.enabled and run_id):
            return
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        # MLflow refuses to change a logged param; a resumed run logs only what is new.
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[i:i + 100])

    @_timed
    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int = 0) -> None:
        if not (self.enabled and run_id):
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if ms:
            self.client.log_batch(run_id, metrics=ms)

    @_timed
    def log_history(self, run_id: str | None, rows: Iterable[Mapping[str, float]], step_key: str = "epoch") -> None:
        """Per-epoch metrics. Steps already logged (a resumed run) are not logged again."""
        if not (self.enabled and run_id):
            return
        logged = {(m.key, m.step) for k in self.client.get_run(run_id).data.metrics
                  for m in self.client.get_metric_history(run_id, k)}
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for row in rows:
            step = int(row[step_key])
            for k, v in row.items():
                if k != step_key and v is not None and (k, step) not in logged:
                    batch.append(Metric(k, float(v), now, step))
        for i in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[i:i + 500])

    @_timed
    def log_artifact(self, run_id: str | None, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and run_id and Path(path).exists():
            self.client.log_artifact(run_id, str(path), artifact_path)

    @_timed
    def log_dict(self, run_id: str | None, obj: dict, name: str) -> None:
        if self.enabled and run_id:
            self.client.log_dict(run_id, obj, name)

    @_timed
    def set_tags(self, run_id: str | None, tags: Mapping[str, str]) -> None:
        if self.enabled and run_id:
            for k, v in tags.items():
                self.client.set_tag(run_id, k, str(v))


def open_tracker(configured_uri: str | None, experiment: str, on_unreachable: str, paths: StudyPaths,
                 study_id: str, echo: Callable[[str], None] | None = None) -> Tracker:
    uri = resolve_uri(configured_uri, paths)
    for k, v in HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    import mlflow  # noqa: F401  (configures its loggers on import: route them to the study's logs/)

    from .console import CONSOLE

    CONSOLE.reroute()
    try:
        check_reachable(uri)
        return Tracker(uri, experiment, study_id, paths.mlflow_artifacts, on_unreachable, echo)
    except UserError:
        if on_unreachable == "continue":
            log.warning("MLflow at %s is unreachable; continuing with Parquet as the record", uri)
            return Tracker.disabled(study_id)
        raise
    except Exception as e:  # mlflow raises MlflowException / requests errors for a broken store
        if on_unreachable == "continue":
            log.warning("MLflow at %s failed (%s); continuing with Parquet as the record", uri, e)
            return Tracker.disabled(study_id)
        raise UserError(f"MLflow tracking at {uri} failed: {str(e).splitlines()[0]}") from None
