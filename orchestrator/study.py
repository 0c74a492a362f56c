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
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from workloads.quant import Policy

from .atomic import atomic_path, write_json
from .config import Config, dump_config
from .console import CONSOLE
from .diskspace import as_disk_full, short_of_space
from .errors import UserError
from .interrupts import Interrupted, received
from .lock import StudyLock
from .paths import StudyPaths
from .preflight import claim_study, record_weights
from .ray_session import ray_session, require_resources
from .results import read_results, upsert_results
from .status import StatusWriter
from .tracking import Tracker, check_reachable, open_tracker, resolve_uri

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


def _union_seconds(spans) -> float:
    """Total length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _epoch_compute(history: list[dict]) -> float:
    """Seconds a training stage spent computing: its epochs' training and validation passes."""
    return sum(h.get("epoch_seconds", 0.0) + h.get("eval_seconds", 0.0) for h in history)


class Study:
    def __init__(self, cfg: Config, echo: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.paths = StudyPaths(cfg.study_dir)
        self.echo = echo or CONSOLE.echo
        self.timings: dict[str, float] = {}
        self.tracker: Tracker = Tracker.disabled(cfg.study.name)
        self.parent_run: str | None = None
        self.stage_runs: dict[str, str | None] = {}
        self.compute_seconds: dict[str, float] = {}   # time inside training/solver/eval kernels, per stage
        self.status: StatusWriter | None = None
        self.started_at = time.time()
        self.t_start = time.perf_counter()
        self.ray_start = 0.0
        self._checked = False
        self.lock: StudyLock | None = None

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

    def preflight(self, wait: bool = False, command: str = "run") -> None:
        """Everything checked before anything starts (Ray, MLflow): the inputs (read only, so bad input
        leaves no study directory behind), then the study directory is writable, not in use by another
        run (``wait``: wait for it) and fits the config. Holds the study's lock until ``release``."""
        if self._checked:
            return
        self.lock, weights = claim_study(self.cfg, self.paths.root, command, wait, self.echo)
        try:
            self._checks_under_lock(weights)
        except BaseException:
            self.release()
            raise
        self._checked = True

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _checks_under_lock(self, weights) -> None:
        cfg = self.cfg
        self.check_config()
        if weights is not None:
            record_weights(self.paths.root, cfg, weights)
        if cfg.tracking.on_unreachable != "continue":  # fail fast with one line, before Ray prints a word
            check_reachable(resolve_uri(cfg.tracking.uri, self.paths))
        short = short_of_space(cfg, [self.paths.root, self.paths.ray_storage(cfg.resources.storage_path)
                                     if "://" not in (cfg.resources.storage_path or "") else None])
        if short:
            self.echo(short)  # a warning: the estimate is an upper bound, and space may be freed meanwhile

    @contextmanager
    def stage(self, name: str, done: bool) -> Iterator[bool]:
        """Time a stage and tell whether to run it (``False``: its output exists, skip)."""
        if done:
            self.echo(f"[{name}] done already, skipped")
            if self.status:
                self.status.stage(name, "done")
            yield False
            return
        self.echo(f"[{name}] running")
        if self.status:
            self.status.stage(name, "running")
        t0 = time.perf_counter()
        try:
            yield True
        finally:
            CONSOLE.close_bars()
        self.timings[name] = time.perf_counter() - t0
        if self.status:
            self.status.stage(name, "done", self.timings[name])
        self._write_timings(complete=False)
        self.echo(f"[{name}] finished in {self.timings[name]:.1f}s")

    def _stage_run(self, name: str) -> str | None:
        if name not in self.stage_runs:
            self.stage_runs[name] = self.tracker.run(f"stage/{name}", name, parent=self.parent_run,
                                                     tags={"mpq.stage": name})
        return self.stage_runs[name]

    def _write_timings(self, complete: bool) -> dict:
        """timings.json: seconds per stage (latest run of each) and, per invocation, the share of wall
        time spent orchestrating (Ray start, MLflow, I/O, scheduling) rather than computing (training
        epochs, ILP solves, evaluation). Rewritten after every stage, so a killed run keeps its stages."""
        path = self.paths.root / "timings.json"
        try:
            old = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:  # torn by a full disk or a kill mid-write of an older version
            old = {}
        stages = {**old.get("stages", {}), **{k: round(v, 3) for k, v in self.timings.items()}}
        # Concurrent work (PTQ tasks) can sum to more than its stage's wall time: cap it there.
        self.compute_seconds = {k: min(v, self.timings.get(k, v)) for k, v in self.compute_seconds.items()}
        compute = sum(self.compute_seconds.values())
        wall = time.perf_counter() - self.t_start
        this = {"started_at": round(self.started_at, 3), "complete": complete, "wall_seconds": round(wall, 3),
                "ray_start_seconds": round(self.ray_start, 3), "mlflow_seconds": round(self.tracker.seconds, 3),
                "compute_seconds": {k: round(v, 3) for k, v in self.compute_seconds.items()},
                "orchestration_share": round(max(0.0, wall - compute) / wall, 4) if wall > 0 else 0.0,
                "stages_run": sorted(self.timings)}
        others = [i for i in old.get("invocations", []) if i.get("started_at") != this["started_at"]]
        write_json(path, {"stages": stages, "total_seconds": round(sum(stages.values()), 3),
                          "invocations": [*others, this]})
        return this

    def _where(self) -> str:
        """The stage that was running and how far it got, e.g. ``finetune (4/12 epochs, 2/6 trials ended)``."""
        st = self.status.state if self.status else {}
        stage = st.get("stage") or "start-up"
        p = (st.get("progress") or {}).get(stage)
        if not p or not p.get("total"):
            return stage
        return f"{stage} ({p['done']}/{p['total']} {p['unit']}" + (f", {p['note']}" if p.get("note") else "") + ")"

    def _on_progress(self, bar) -> None:
        if self.status is not None:
            self.status.progress(bar.key, bar.n, bar.total, bar.unit, bar.postfix)

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        """The whole study (resumed where an earlier run stopped); holds the study's lock throughout."""
        self.preflight()
        try:
            return self._run()
        finally:
            self.release()

    def _run(self) -> int:
        cfg = self.cfg
        self.status = StatusWriter(self.paths.root)
        CONSOLE.on_progress = self._on_progress
        # Opening MLflow (import, sqlite schema, parent run) and starting Ray each take seconds of
        # mostly waiting; do them side by side. An MLflow error still stops the study before any stage.
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-open")
        opening = pool.submit(self._open_tracking)
        pool.shutdown(wait=False)
        try:
            t_ray = time.perf_counter()
            with ray_session(cfg.resources.address, cfg.resources.num_cpus, self.paths,
                             self.paths.ray_storage(cfg.resources.storage_path)):
                self.ray_start = time.perf_counter() - t_ray
                opening.result()
                require_resources(cfg.resources)
                fp = self.run_pretrain()
                indicators = self.run_indicators(fp)
                rows = self.run_search(indicators, fp)
                selected = self.run_select(rows, indicators)
                self.run_finetune(selected, fp)
                self.run_ptq(selected, fp)
            self._backfill_mlflow(selected)
            self.run_report()
        except BaseException as e:
            interrupted = isinstance(e, KeyboardInterrupt)
            full = None if interrupted else as_disk_full(e, self.paths.root)
            where = self._where() if interrupted else ""
            self.status.finish("interrupted" if interrupted else "failed",
                               None if interrupted else (str(full or e).strip().splitlines() or [type(e).__name__])[0])
            wait([opening])  # never mark or leave a run while the opener may still be creating it
            try:
                self.tracker.set_tags(self.parent_run, {"mpq.status": "interrupted" if interrupted else "failed"})
                self.tracker.finish(self.parent_run, "KILLED" if interrupted else "FAILED")
            except Exception:
                if full is None and not interrupted:
                    raise
                # on a full disk (MLflow's sqlite is on it too) or mid-interrupt: the first error counts
            if full is not None:
                raise full from None
            if interrupted:
                # Ray re-raises a plain KeyboardInterrupt from inside ray.get: the handler knows which signal.
                signum = received() or getattr(e, "signum", signal.SIGINT)
                raise Interrupted(signum, f"interrupted during {where}; run the same command to resume") from None
            raise
        finally:
            CONSOLE.on_progress = None
        this = self._write_timings(complete=True)
        self.tracker.log_metrics(self.parent_run, {"wall_seconds": this["wall_seconds"],
                                                   "orchestration_share": this["orchestration_share"]})
        self._finish_parent()
        self.status.finish("complete")
        warned = CONSOLE.warnings_line()
        if warned:
            self.echo(warned)
        self.echo(f"study {cfg.study.name} complete in {this['wall_seconds']:.0f}s "
                  f"(orchestration {100 * this['orchestration_share']:.0f}%): {self.paths.root}")
        return 0

    def _open_tracking(self) -> None:
        cfg = self.cfg
        self.tracker = open_tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.on_unreachable,
                                    self.paths, cfg.study.name, echo=self.echo)
        self.parent_run = self.tracker.run("study", cfg.study.name, tags={"mpq.status": "running"})
        self.tracker.log_params(self.parent_run, _flatten(cfg.to_dict()))

    def _log_result_runs(self, rows: list[dict], by_id: dict[str, dict], histories: dict) -> int:
        """One MLflow run per result row without one; the rows' run ids are written back to Parquet.
        Returns how many rows got a run (fewer when MLflow is off or stops answering)."""
        fixed = []
        for r in rows:
            sel = by_id.get(r["policy_id"])
            if r["mlflow_run_id"] or sel is None or not self.tracker.enabled:
                continue
            lr = r["lr"] if r["stage"] == "finetune" else None
            run_id = self._log_policy_run(r["stage"], sel, lr, histories.get((r["policy_id"], r["lr"]), []), r)
            if run_id and self.tracker.enabled:  # a run whose logging broke off is redone by the next backfill
                fixed.append({**r, "mlflow_run_id": run_id})
        if fixed:
            upsert_results(self.results_path, fixed)
        return len(fixed)

    def _backfill_mlflow(self, selected: list[dict]) -> None:
        """Give every result row its MLflow run: rows recorded while MLflow was unreachable
        (``tracking.on_unreachable: continue``) are logged now that it is back."""
        if not self.tracker.enabled:
            return
        n = self._log_result_runs(read_results(self.results_path), {s["policy_id"]: s for s in selected}, {})
        if n:
            self.echo(f"[mlflow] backfilled {n} result(s) recorded while MLflow was unreachable")

    def _finish_parent(self) -> None:
        for _name, rel in (("search.parquet", "search/search.parquet"), ("results.parquet", "results/results.parquet"),
                          ("timings.json", "timings.json"), ("config.yaml", "config.yaml")):
            self.tracker.log_artifact(self.parent_run, self.paths.root / rel, "tables")
        self.tracker.set_tags(self.parent_run, {"mpq.status": "complete"})
        for run_id in self.stage_runs.values():
            self.tracker.finish(run_id)
        self.tracker.finish(self.parent_run)

    # --------------------------------------------------------------- stages
    def run_pretrain(self) -> Path:
        from .training import given_weights, run_pretrain

        cfg = self.cfg
        given = given_weights(cfg)
        if given is not None:
            return given
        with self.stage("pretrain", self.paths.fp_checkpoint.exists()) as todo:
            if todo:
                res = run_pretrain(cfg, self.paths)
                run = self._stage_run("pretrain")
                self.tracker.log_history(run, res.history)
                self.tracker.log_metrics(run, res.metrics)
                self.tracker.finish(run)
                self.compute_seconds["pretrain"] = _epoch_compute(res.history)
        return self.paths.fp_checkpoint

    def run_indicators(self, fp: Path):
        from .indicators import Indicators
        from .training import run_indicators

        with self.stage("indicators", self.paths.indicators_parquet.exists()) as todo:
            if todo:
                res = run_indicators(self.cfg, self.paths, fp)
                run = self._stage_run("indicators")
                self.tracker.log_history(run, res.history)
                self.tracker.log_metrics(run, res.metrics)
                self.tracker.log_artifact(run, self.paths.indicators_parquet)
                self.tracker.log_artifact(run, self.paths.indicators_json)
                self.tracker.finish(run)
                self.compute_seconds["indicators"] = _epoch_compute(res.history)
        return Indicators.load(self.paths.indicators_parquet)

    # The search stage's output is valid for one (indicators, search recipe); a changed grid reruns the
    # stage, and the LIMPQ grid then resumes point by point (finished points are never solved again).
    def _digest(self, *sections: str, extra: object = None) -> str:
        d = self.cfg.to_dict()
        blob = json.dumps({s: d[s] for s in sections} | {"extra": extra}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def _stage_done(self, output: Path, digest: str) -> bool:
        meta = output.with_name(output.name + ".digest")
        return output.exists() and meta.exists() and meta.read_text().strip() == digest

    @staticmethod
    def _mark_done(output: Path, digest: str) -> None:
        with atomic_path(output.with_name(output.name + ".digest")) as tmp:
            tmp.write_text(digest + "\n")

    @property
    def search_path(self) -> Path:
        return self.paths.search_dir / "search.parquet"

    def _fp_model(self, fp: Path | None, indicators):
        """The FP model for MixQuant's QE table, or None when there are no weights (imported indicators)."""
        from workloads.models import build_model, load_weights

        from .training import data_meta

        if fp is None or not Path(fp).exists():
            return None
        classes, shape = data_meta(self.cfg)
        model = build_model(self.cfg.model.name, classes, shape[0])
        load_weights(model, fp)
        return model

    def run_search(self, indicators, fp: Path | None = None) -> list[dict]:
        from .baselines import run_baselines
        from .grid import run_limpq_grid
        from .mixquant import run_mixquant
        from .search_rows import ModelCosts, write_search_rows

        cfg = self.cfg
        digest = self._digest("search", "mixquant", "baselines", extra=indicators.to_json_dict())
        with self.stage("search", self._stage_done(self.search_path, digest)) as todo:
            if not todo:
                return pq.read_table(self.search_path).to_pylist()
            costs = ModelCosts.from_indicators(indicators)
            t0 = time.perf_counter()
            rows = list(run_limpq_grid(indicators, cfg.search, self.paths.search_dir / "limpq",
                                       use_ray=True, progress=True))
            t_grid = time.perf_counter() - t0
            model = self._fp_model(fp, indicators) if cfg.mixquant.enabled else None
            if cfg.mixquant.enabled and model is None:
                self.echo("[search] MixQuant skipped: no FP weights (give model.weights)")
            if model is not None:
                rows += run_mixquant(model, costs, cfg.mixquant, self.paths.search_dir).rows
            rows += run_baselines(costs, cfg.baselines, indicators.bits, rows, seed=cfg.study.seed).rows
            write_search_rows(self.search_path, rows)
            write_json(self.paths.search_dir / "layers.json", list(costs.layers))
            self._mark_done(self.search_path, digest)
            ok = [r for r in rows if r["status"] == "optimal"]
            summary = {"points": len(rows), "optimal": len(ok),
                       "infeasible": sum(r["status"] == "infeasible" for r in rows),
                       "errors": sum(r["status"] == "error" for r in rows),
                       "distinct_policies": len({r["policy_id"] for r in ok}),
                       "limpq_points": sum(r["searcher"] == "limpq" for r in rows),
                       "limpq_grid_seconds": t_grid,
                       "solve_seconds": sum(r["solve_seconds"] or 0.0 for r in rows)}
            self.compute_seconds["search"] = summary["solve_seconds"]
            self.echo(f"[search] {summary['points']} points ({summary['optimal']} optimal, "
                      f"{summary['infeasible']} infeasible), {summary['distinct_policies']} distinct policies")
            run = self._stage_run("search")
            self.tracker.log_params(run, {"limpq_points": summary["limpq_points"], "alpha": cfg.search.alpha,
                                          "bitops": cfg.search.bitops,
                                          "compression_ratio": cfg.search.compression_ratio,
                                          "qem": cfg.mixquant.qem})
            self.tracker.log_metrics(run, summary)
            self.tracker.log_artifact(run, self.search_path)
            self.tracker.finish(run)
        return rows

    @property
    def selected_path(self) -> Path:
        return self.paths.search_dir / "selected.json"

    def run_select(self, rows: list[dict], indicators) -> list[dict]:
        from .search_rows import ModelCosts
        from .select import select_policies

        digest = self._digest("search", "mixquant", "baselines", "select",
                              extra=sorted(r["point_id"] + str(r.get("policy_id")) for r in rows))
        with self.stage("select", self._stage_done(self.selected_path, digest)) as todo:
            if not todo:
                return json.loads(self.selected_path.read_text())["selected"]
            selected = select_policies(rows, self.cfg, ModelCosts.from_indicators(indicators))
            write_json(self.selected_path, {"selected": selected})
            self._mark_done(self.selected_path, digest)
            counts: dict[str, int] = {}
            for s in selected:
                counts[s["searcher"]] = counts.get(s["searcher"], 0) + 1
            self.echo("[select] " + ", ".join(f"{n} {k}" for k, n in counts.items()))
            self.tracker.log_dict(self._stage_run("select"), {"selected": selected}, "selected.json")
            self.tracker.finish(self._stage_run("select"))
        return selected

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
        self.tracker.log_metrics(run, {k: final.get(k) for k in ("top1", "top5", "loss", "val_top1", "val_loss")} |
                                 {"bitops": sel.get("bitops"), "size_bits": sel.get("size_bits")})
        self.tracker.finish(run)
        return run

    def run_finetune(self, selected: list[dict], fp: Path) -> None:
        from .finetune import holdout_description, run_finetunes

        cfg = self.cfg
        todo = [s for s in selected if "finetune" in s["evaluate"]]
        lrs = [cfg.finetune.lr] + [lr for lr in cfg.finetune.lr_grid if lr != cfg.finetune.lr]
        # Ended trials: trained to this budget, or early-stopped under it (ASHA decided; not rerun).
        have = {(r["policy_id"], round(r["lr"], 12)) for r in read_results(self.results_path)
                if r["stage"] == "finetune" and (r.get("budget_epochs") if r.get("status") else r["epochs"])
                == cfg.finetune.epochs}
        missing = [s for s in todo for lr in lrs if (s["policy_id"], round(lr, 12)) not in have]
        with self.stage("finetune", not missing) as run:
            if not run:
                return
            by_id = {s["policy_id"]: s for s in todo}
            # A new finetune recipe or policy set is a new Tune experiment; the same one restores.
            recipe = {k: v for k, v in cfg.to_dict()["finetune"].items() if k != "keep_checkpoints"}
            digest = hashlib.sha1(json.dumps([recipe, sorted(by_id)]).encode()).hexdigest()[:10]
            init = fp
            if cfg.finetune.from_indicator_model:
                init = self.paths.indicator_model
                if not init.exists():
                    raise UserError(f"finetune.from_indicator_model needs the jointly trained model {init} "
                                    "(imported indicators have none)")
            outcomes = run_finetunes(cfg, self.paths, [Policy.from_json(s["policy"]) for s in todo], init,
                                     name=f"finetune-{digest}")
            rows = []
            for o in outcomes:
                sel = by_id[o.policy_id]
                if o.status != "TERMINATED" or "val_top1" not in o.metrics:
                    self.echo(f"[finetune] trial for policy {o.policy_id} lr={o.lr:g} failed; see Ray logs")
                    continue
                complete = "top1" in o.metrics  # measured on the evaluation split after the last epoch only
                rows.append({"policy_id": o.policy_id, "searcher": sel["searcher"], "stage": "finetune",
                             "lr": o.lr, "epochs": int(o.metrics.get("epochs_trained", 0)),
                             "budget_epochs": cfg.finetune.epochs, "status": "complete" if complete else "stopped",
                             "val_top1": o.metrics["val_top1"], "val_loss": o.metrics.get("val_loss"),
                             "val_split": holdout_description(cfg, int(o.metrics.get("holdout_samples", 0))),
                             "top1": o.metrics.get("top1"), "top5": o.metrics.get("top5"),
                             "loss": o.metrics.get("loss"),
                             "bitops": sel["bitops"], "size_bits": sel["size_bits"], "mlflow_run_id": None,
                             "seconds": float(o.metrics.get("time_total_s", 0.0))})
            stopped = sum(r["status"] == "stopped" for r in rows)
            if stopped:
                self.echo(f"[finetune] {stopped} trial(s) early-stopped by ASHA "
                          "(recorded as stopped, never on a frontier)")
            # Trials run concurrently: compute time is the union of their epochs' wall-clock spans.
            self.compute_seconds["finetune"] = _union_seconds(
                (h["epoch_start"], h["epoch_start"] + h["epoch_seconds"])
                for o in outcomes for h in o.history if "epoch_start" in h and "epoch_seconds" in h)
            upsert_results(self.results_path, rows)  # the record first: MLflow may fail or be gone
            histories = {(o.policy_id, o.lr): o.history for o in outcomes}
            self._log_result_runs(rows, by_id, histories)
            self.tracker.log_artifact(self._stage_run("finetune"), self.results_path)
            failed = len(missing) - len(rows)
            if failed > 0:
                raise UserError(f"{failed} finetune trial(s) failed; rerun the study to retry them")

    @property
    def results_path(self) -> Path:
        return self.paths.results_dir / "results.parquet"

    def run_ptq(self, selected: list[dict], fp: Path) -> None:
        from .ptq_eval import evaluate_ptq

        todo = [s for s in selected if "ptq" in s["evaluate"]]
        have = {r["policy_id"] for r in read_results(self.results_path) if r["stage"] == "ptq"}
        missing = [s for s in todo if s["policy_id"] not in have]
        with self.stage("ptq", not missing) as run:
            if not run:
                return
            if not Path(fp).exists():
                self.echo("[ptq] skipped: no FP weights")
                return
            out = evaluate_ptq(self.cfg, Path(fp), [Policy.from_json(s["policy"]) for s in missing], use_ray=True)
            by_id = {s["policy_id"]: s for s in missing}
            rows = []
            for r in out:
                sel = by_id[r["policy_id"]]
                rows.append({**r, "searcher": sel["searcher"], "stage": "ptq", "lr": None, "epochs": 0,
                             "budget_epochs": 0, "status": "complete",
                             "bitops": sel["bitops"], "size_bits": sel["size_bits"], "mlflow_run_id": None})
                self.compute_seconds["ptq"] = self.compute_seconds.get("ptq", 0.0) + float(r.get("seconds") or 0.0)
            upsert_results(self.results_path, rows)  # the record first: MLflow may fail or be gone
            self._log_result_runs(rows, by_id, {})
            self.tracker.log_artifact(self._stage_run("ptq"), self.results_path)
            self.tracker.finish(self._stage_run("ptq"))

    def run_report(self) -> None:
        from .report import build_report

        with self.stage("report", False):
            out = build_report(self.paths.root)
            run = self._stage_run("report")
            for p in sorted(out.iterdir()):
                if p.is_file() and not p.name.startswith("."):
                    self.tracker.log_artifact(run, p, "report")
            self.tracker.finish(run)
            self.echo(f"[report] {out / 'index.html'}")
