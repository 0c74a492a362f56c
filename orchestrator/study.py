"""The study pipeline: pretrain? -> indicators -> search -> select -> finetune / ptq -> report.

Each stage has one durable output in the study directory and is skipped when that output exists, so
rerunning a study resumes it. The search grid resumes point by point and Tune restores unfinished
finetunes, so even an interrupted stage loses only the work in flight.

MLflow is synced from the durable outputs after each stage (idempotently, keyed by ``mpq.key``): a
study that ran while MLflow was unreachable (``tracking.on_unreachable: continue``) is backfilled by
the next run, and a resumed study never duplicates runs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.parquet as pq
import yaml

from workloads.quant import Policy

from .atomic import atomic_path, write_json
from .config import Config, dump_config
from .errors import UserError
from .paths import StudyPaths
from .ray_session import ray_session, require_resources
from .results import read_results, upsert_results
from .tracking import Tracker, open_tracker

log = logging.getLogger(__name__)

# Sections whose change invalidates existing outputs; the rest may change between runs.
FROZEN_SECTIONS = ("model", "data", "pretrain", "indicators")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


class Study:
    def __init__(self, cfg: Config, echo: Callable[[str], None] = print):
        self.cfg = cfg
        self.paths = StudyPaths(cfg.study_dir)
        self.echo = echo
        self.timings: dict[str, float] = {}
        self.tracker: Tracker = Tracker.disabled(cfg.study.name)
        self.parent_run: str | None = None
        self.stage_runs: dict[str, str | None] = {}

    # ----------------------------------------------------------- bookkeeping
    def check_config(self) -> None:
        """Refuse to resume a study directory made with a different model/data/training recipe."""
        path = self.paths.config
        new = self.cfg.to_dict()
        if path.exists():
            old = yaml.safe_load(path.read_text()) or {}
            changed = [s for s in FROZEN_SECTIONS if old.get(s) != new.get(s)]
            if old.get("study", {}).get("seed") != new["study"]["seed"]:
                changed.append("study.seed")
            if changed:
                raise UserError(f"study directory {self.paths.root} was made with a different "
                                f"{', '.join(changed)}; use a new study.dir or remove the old one")
        with atomic_path(path) as tmp:
            tmp.write_text(dump_config(self.cfg))

    @contextmanager
    def stage(self, name: str, done: bool) -> Iterator[bool]:
        """Time a stage and tell whether to run it (``False``: its output exists, skip)."""
        if done:
            self.echo(f"[{name}] done already, skipped")
            yield False
            return
        self.echo(f"[{name}] running")
        t0 = time.perf_counter()
        yield True
        self.timings[name] = time.perf_counter() - t0
        self.echo(f"[{name}] finished in {self.timings[name]:.1f}s")

    def _stage_run(self, name: str) -> str | None:
        if name not in self.stage_runs:
            self.stage_runs[name] = self.tracker.run(f"stage/{name}", name, parent=self.parent_run,
                                                     tags={"mpq.stage": name})
        return self.stage_runs[name]

    def _write_timings(self) -> None:
        path = self.paths.root / "timings.json"
        old = json.loads(path.read_text()) if path.exists() else {"stages": {}}
        stages = {**old.get("stages", {}), **{k: round(v, 3) for k, v in self.timings.items()}}
        write_json(path, {"stages": stages, "total_seconds": round(sum(stages.values()), 3)})

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        cfg = self.cfg
        self.check_config()
        t_start = time.perf_counter()
        self.tracker = open_tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.on_unreachable,
                                    self.paths, cfg.study.name)
        self.parent_run = self.tracker.run("study", cfg.study.name, tags={"mpq.status": "running"})
        self.tracker.log_params(self.parent_run, _flatten(cfg.to_dict()))
        with ray_session(cfg.resources.address, cfg.resources.num_cpus, self.paths):
            require_resources(cfg.resources.num_workers, cfg.resources.cpus_per_worker, cfg.resources.use_gpu)
            fp = self.run_pretrain()
            indicators = self.run_indicators(fp)
            table = self.run_search(indicators)
            selected = self.run_select(table, indicators)
            self.run_finetune(selected, fp)
            self.run_ptq(selected, fp)
        self.run_report()
        self.timings["total_wall"] = time.perf_counter() - t_start
        self._write_timings()
        self._finish_parent()
        self.echo(f"study {cfg.study.name} complete: {self.paths.root}")
        return 0

    def _finish_parent(self) -> None:
        for name, rel in (("search.parquet", "search/search.parquet"), ("results.parquet", "results/results.parquet"),
                          ("timings.json", "timings.json"), ("config.yaml", "config.yaml")):
            self.tracker.log_artifact(self.parent_run, self.paths.root / rel, "tables")
        self.tracker.set_tags(self.parent_run, {"mpq.status": "complete"})
        for name, run_id in self.stage_runs.items():
            self.tracker.finish(run_id)
        self.tracker.finish(self.parent_run)

    # --------------------------------------------------------------- stages
    def run_pretrain(self) -> Path:
        from .training import run_pretrain

        cfg = self.cfg
        if cfg.model.checkpoint:
            return Path(cfg.model.checkpoint)
        with self.stage("pretrain", self.paths.fp_checkpoint.exists()) as todo:
            if todo:
                res = run_pretrain(cfg, self.paths)
                run = self._stage_run("pretrain")
                self.tracker.log_history(run, getattr(res, "history", []) or [])
        return self.paths.fp_checkpoint

    def run_indicators(self, fp: Path):
        from .indicators import Indicators
        from .training import run_indicators

        with self.stage("indicators", self.paths.indicators_parquet.exists()) as todo:
            if todo:
                res = run_indicators(self.cfg, self.paths, fp)
                run = self._stage_run("indicators")
                self.tracker.log_history(run, getattr(res, "history", []) or [])
                self.tracker.log_artifact(run, self.paths.indicators_parquet)
                self.tracker.log_artifact(run, self.paths.indicators_json)
        return Indicators.load(self.paths.indicators_parquet)

    def run_search(self, indicators):
        raise NotImplementedError  # wired once the searchers land

    def run_select(self, table, indicators) -> list[dict]:
        raise NotImplementedError

    def _log_policy_run(self, stage: str, sel: dict, lr: float | None, history: list[dict],
                        final: dict) -> str | None:
        """One MLflow run per evaluated policy, nested under its stage run."""
        key = f"policy/{stage}/{sel['policy_id']}" + (f"/lr={lr:g}" if lr is not None else "")
        if self.tracker.is_finished(key):
            return self.tracker.find(key).info.run_id
        run = self.tracker.run(key, f"{stage}-{sel['searcher']}-{sel['policy_id'][:8]}",
                               parent=self._stage_run(stage),
                               tags={"mpq.policy_id": sel["policy_id"], "mpq.searcher": sel["searcher"]})
        params = {k: sel.get(k) for k in ("searcher", "policy_id", "bitops_budget", "size_budget",
                                            "compression_ratio_budget", "alpha", "qem", "bitops", "size_bits")
                  if sel.get(k) is not None}
        if lr is not None:
            params["lr"] = lr
        self.tracker.log_params(run, params)
        self.tracker.log_dict(run, sel["policy"], "policy.json")
        self.tracker.log_history(run, history)
        self.tracker.log_metrics(run, {k: final.get(k) for k in ("top1", "top5", "loss")} |
                                 {"bitops": sel.get("bitops"), "size_bits": sel.get("size_bits")})
        self.tracker.finish(run)
        return run

    def run_finetune(self, selected: list[dict], fp: Path) -> None:
        from .finetune import run_finetunes

        cfg = self.cfg
        wanted = {"limpq"} | ({"uniform"} if cfg.select.include_uniform else set()) | \
                 ({"random"} if cfg.select.include_random else set())
        todo = [s for s in selected if s["searcher"] in wanted]
        lrs = [cfg.finetune.lr] + [lr for lr in cfg.finetune.lr_grid if lr != cfg.finetune.lr]
        have = {(r["policy_id"], round(r["lr"], 12)) for r in read_results(self.results_path)
                if r["stage"] == "finetune" and r["epochs"] == cfg.finetune.epochs}
        missing = [s for s in todo for lr in lrs if (s["policy_id"], round(lr, 12)) not in have]
        with self.stage("finetune", not missing) as run:
            if not run:
                return
            by_id = {s["policy_id"]: s for s in todo}
            # A new finetune recipe or policy set is a new Tune experiment; the same one restores.
            digest = hashlib.sha1(json.dumps([cfg.to_dict()["finetune"], sorted(by_id)]).encode()).hexdigest()[:10]
            outcomes = run_finetunes(cfg, self.paths, [Policy.from_json(s["policy"]) for s in todo], fp,
                                     name=f"finetune-{digest}")
            rows = []
            for o in outcomes:
                sel = by_id[o.policy_id]
                if o.status != "TERMINATED" or "top1" not in o.metrics:
                    self.echo(f"[finetune] trial for policy {o.policy_id} lr={o.lr:g} failed; see Ray logs")
                    continue
                run_id = self._log_policy_run("finetune", sel, o.lr, o.history, o.metrics)
                rows.append({"policy_id": o.policy_id, "searcher": sel["searcher"], "stage": "finetune",
                             "lr": o.lr, "epochs": cfg.finetune.epochs, "top1": o.metrics["top1"],
                             "top5": o.metrics.get("top5"), "loss": o.metrics.get("loss"),
                             "bitops": sel["bitops"], "size_bits": sel["size_bits"], "mlflow_run_id": run_id,
                             "seconds": float(o.metrics.get("time_total_s", 0.0))})
            upsert_results(self.results_path, rows)
            self.tracker.log_artifact(self._stage_run("finetune"), self.results_path)
            failed = len(missing) - len(rows)
            if failed > 0:
                raise UserError(f"{failed} finetune trial(s) failed; rerun the study to retry them")

    @property
    def results_path(self) -> Path:
        return self.paths.results_dir / "results.parquet"

    def run_ptq(self, selected: list[dict], fp: Path) -> None:
        raise NotImplementedError

    def run_report(self) -> None:
        raise NotImplementedError
