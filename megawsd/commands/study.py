"""Run a schedule study, or write its report.

    megawsd study configs/study-cpu.yaml                 # plan, train what is missing, report
    megawsd study configs/study-cpu.yaml --resume        # continue a killed study
    megawsd study configs/study-gpu.yaml --nproc 8 --jobs 1
    megawsd study configs/study-cpu.yaml --dry-run       # list the runs it would train
    megawsd study report studies/study-cpu               # report from saved results only
    megawsd study configs/study-cpu.yaml --executor slurm  # every run a SLURM job (submitit)
    megawsd study status studies/study-cpu               # done/queued/running/failed, per job

A study compares cosine, linear, WSD cooldown shapes and fractions (one constant-LR main run
plus cooldown branches), schedule-free (with and without a short cooldown) and constant LR +
SWA/EMA over budgets, LR grids and seeds, with compute accounting and a scaling-law fit.
See docs/study.md.
"""

from __future__ import annotations

import argparse

from megawsd.errors import ConfigError
from megawsd.study import slurm
from megawsd.study.report import write_report
from megawsd.study.runner import run_study, study_dir_for
from megawsd.study.spec import load_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "target",
        metavar="STUDY.yaml | report | status",
        help="a study config to run, or `report`/`status` followed by a study directory",
    )
    parser.add_argument(
        "study_dir",
        nargs="?",
        metavar="STUDY_DIR",
        help="with `report`/`status`: the study directory (e.g. studies/study-cpu)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="study directory (default: the config's `out`, else studies/NAME)",
    )
    parser.add_argument("--nproc", type=int, default=None, help="ranks per run (GPUs; CPU ranks)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at once (independent runs; default 1)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue a study directory that holds runs already"
    )
    parser.add_argument("--dry-run", action="store_true", help="plan only: list the runs to train")
    parser.add_argument("--no-report", action="store_true", help="do not write the report")
    parser.add_argument(
        "--executor",
        choices=["local", "slurm"],
        default=None,
        help="where runs run: local subprocesses, or SLURM jobs (default: the study's "
        "`executor.kind`, else local; see docs/study.md, On a cluster)",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="slurm: exit once submitted (the jobs run on; `megawsd study status DIR`)",
    )


def run(args: argparse.Namespace) -> int:

    if args.target in ("report", "status"):
        if not args.study_dir:
            raise ConfigError(
                "STUDY_DIR = None: give the study directory, e.g. "
                f"`megawsd study {args.target} studies/study-cpu`"
            )
        if args.target == "status":
            print(slurm.status(args.study_dir))
            return 0
        path = write_report(args.study_dir)
        print(f"report: {path}")
        return 0
    if args.study_dir:
        raise ConfigError(
            f"STUDY_DIR = {args.study_dir!r}: only `megawsd study report DIR` takes "
            "a directory; to choose where a study goes, use --out"
        )

    spec = load_spec(args.target)
    kind = args.executor or spec.executor.kind
    ledger = study_dir_for(spec, args.out) / "slurm" / "jobs.json"
    if args.executor is None and kind == "local" and ledger.exists():
        raise ConfigError(
            f"--executor = None: this study was submitted to SLURM ({ledger}); pass "
            "--executor slurm (or set executor.kind: slurm) to continue it there, or "
            "--executor local to run what is missing here"
        )
    if kind == "slurm":
        if args.jobs != 1:
            raise ConfigError(
                f"--jobs = {args.jobs}: the local executor's option; on SLURM every run is a "
                "job and SLURM decides how many run at once (drop --jobs)"
            )
        out = slurm.run_study_slurm(
            args.target,
            out=args.out,
            nproc=args.nproc,
            resume=args.resume,
            dry_run=args.dry_run,
            detach=args.detach,
        )
        if not args.dry_run and not args.detach:
            print(f"report: {out / 'report.md'}")
        return 0
    out = run_study(
        args.target,
        out=args.out,
        nproc=args.nproc,
        resume=args.resume,
        jobs=args.jobs,
        dry_run=args.dry_run,
        report=not args.no_report,
    )
    if not args.dry_run and not args.no_report:
        print(f"report: {out / 'report.md'}")
    return 0
