"""`mpqsweep submit CONFIG [key=value ...] --address http://HEAD:8265`: run a study as a Ray job.

The config is loaded and validated here first, then the cluster is checked (reachable, auth token,
enough CPUs/GPUs) — all before anything is submitted. The job runs
``python -m orchestrator.cli run CONFIG key=value ... resources.address=auto`` in the uploaded working
dir (the same as ``ray job submit --working-dir . -- mpqsweep run CONFIG key=value ...
resources.address=auto``). By default the cluster image provides the dependencies; ``--runtime-env
cluster/runtime_env.yaml`` or ``--pip`` add the pinned direct dependencies to the job's runtime_env
(slow on first use: a virtualenv that downloads torch). Overrides may come before or after options.

Exit code: 0 when the job succeeded (or with ``--no-wait`` once it is submitted); the driver's exit
code when it failed (2: the cluster found the input bad), else 1; 2 for bad input found here.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class _OptionsFirstParser(argparse.ArgumentParser):
    """Accepts overrides after options (``submit CONFIG --address URL k=v``): argparse alone consumes
    all positionals at their first run and rejects later ones, so options are moved first."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        opts, pos, i = [], [], 0
        while i < len(args):
            tok = args[i]
            if tok == "--":
                pos += args[i + 1:]
                break
            action = self._option_string_actions.get(tok.split("=", 1)[0]) if tok.startswith("-") else None
            if action is None:
                pos.append(tok)
            elif "=" in tok or action.nargs == 0:
                opts.append(tok)
            else:
                opts += args[i:i + 2]
                i += 1
            i += 1
        return super().parse_known_args(opts + pos, namespace)


def register(sub) -> None:
    p = sub.add_parser("submit", help="run a study as a Ray job on a cluster (validates config and cluster first)")
    p.__class__ = _OptionsFirstParser
    p.add_argument("config", nargs="?", help="study YAML inside --working-dir")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. indicators.epochs=1")
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                   help="Ray dashboard / job server, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--working-dir", default=".", help="directory uploaded as the job's working dir (default: .)")
    p.add_argument("--runtime-env", metavar="YAML",
                   help="runtime_env file to start from (e.g. cluster/runtime_env.yaml)")
    p.add_argument("--pip", action="store_true",
                   help="install the pinned dependencies (constraints.txt) in the job's runtime_env "
                        "instead of relying on the cluster image")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job, e.g. MLFLOW_TRACKING_URI=http://mlflow:5000")
    p.add_argument("--token-file", help="Ray auth token file (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, "
                                        "~/.ray/auth_token)")
    p.add_argument("--skip-resource-check", action="store_true",
                   help="submit even if the alive nodes lack the CPUs/GPUs the config needs (autoscaling clusters)")
    p.add_argument("--submission-id", help="job id to use (default: mpq-<study>-<time>-<random>)")
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return")
    p.add_argument("--stop", metavar="SUBMISSION_ID", help="stop a submitted job and return")
    p.add_argument("--logs", metavar="SUBMISSION_ID", help="print a job's logs so far and return")
    p.set_defaults(func=run)


def _echo(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args) -> int:
    from .. import jobs
    from ..config import load_config
    from ..errors import UserError

    if not args.address:
        raise UserError("--address is required (the Ray dashboard, e.g. http://127.0.0.1:8265)")

    if args.stop or args.logs:
        if args.stop and args.logs:
            raise UserError("give --stop or --logs, not both")
        conn = jobs.connect(args.address, args.token_file)
        if args.stop:
            stopped = jobs.stop(conn, args.stop)
            print(f"{args.stop}: {'stop requested' if stopped else 'was not running'}")
        else:
            sys.stdout.write(jobs.logs(conn, args.logs))
        return 0

    if not args.config:
        raise UserError("a CONFIG is required (or --stop / --logs SUBMISSION_ID)")
    # 1. everything local first: config, working dir, runtime_env
    cfg = load_config(args.config, args.overrides)
    study_dir = Path(cfg.study.dir)
    if study_dir.is_absolute() and study_dir.is_dir():  # shared storage this machine sees too
        from ..lock import describe, owner_alive, read_lock

        owner = read_lock(study_dir)
        if owner and owner_alive(owner, cfg.study.lock_stale_s):
            raise UserError(f"study {study_dir} is being run by {describe(owner)}; submit again when it is done")
    working_dir = Path(args.working_dir).expanduser().resolve()
    if not working_dir.is_dir():
        raise UserError(f"--working-dir {args.working_dir} is not a directory")
    config_rel = jobs.config_in_working_dir(Path(args.config), working_dir)
    env_vars = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item!r} is not KEY=VALUE")
        env_vars[key] = value
    base = jobs.read_runtime_env_file(args.runtime_env) if args.runtime_env else None
    runtime_env = jobs.build_runtime_env(working_dir, base=base, pip=args.pip, env_vars=env_vars)

    # 2. the cluster: reachable, authenticated, able to run this config — still nothing submitted
    conn = jobs.connect(args.address, args.token_file)
    if not args.skip_resource_check:
        jobs.check_cluster_fits(conn, cfg)
    if conn.token_source:  # after the checks: bad input stays one line
        _echo(f"using the Ray auth token from {conn.token_source}")

    # 3. submit
    if cfg.resources.address not in (None, "auto"):
        _echo(f"note: resources.address={cfg.resources.address} is replaced by auto: "
              "the job joins the cluster it runs on")
    if not Path(cfg.study.dir).is_absolute():
        _echo(f"warning: study.dir {cfg.study.dir!r} is relative: on the cluster it lands in the job's temporary "
              "working dir; use a shared path (e.g. study.dir=/mnt/shared/studies/NAME)")
    entry = jobs.entrypoint(config_rel, list(args.overrides))
    sub_id = jobs.submit(conn, entry=entry, runtime_env=runtime_env,
                         sub_id=args.submission_id or jobs.submission_id(cfg.study.name),
                         metadata={"mpq.study": cfg.study.name, "mpq.config": config_rel})
    print(sub_id, flush=True)
    _echo(f"submitted {sub_id} to {conn.address}: {entry}")
    if args.no_wait:
        _echo(f"follow: mpqsweep submit --address {conn.address} --logs {sub_id}; "
              f"stop: mpqsweep submit --address {conn.address} --stop {sub_id}")
        return 0
    try:
        info = jobs.follow(conn, sub_id, echo=_echo)
    except KeyboardInterrupt:
        _echo(f"stopped following; the job keeps running. Stop it with: "
              f"mpqsweep submit --address {conn.address} --stop {sub_id}")
        return 130
    code = jobs.exit_code_for(info)
    _echo(f"job {sub_id} {info.status}" + (f": {info.message.splitlines()[0]}" if code and info.message else ""))
    return code
