"""`megawsd study --executor slurm` on a real SLURM cluster (tests/cluster: munge, slurmctld and
one slurmd per network-namespace host; nothing mocked), against `--executor local`.

The mini study of tests/test_study_e2e.py (a constant main with two 1-sqrt cooldown branches,
the constant arm and SWA of the main's checkpoints): on SLURM it is 6 jobs, the main cut in
three segments at its branch points (6, 9) and its end (12), each branch ``afterok`` on its
segment, and the averages + report job after everything.

- default suite: a smaller study (one budget, no SWA: 4 jobs) is submitted, then its branch
  is ``scancel``ed, the running main segment is ``scontrol requeue``d and the driver is
  SIGKILLed; ``--resume`` resubmits the cancelled branch and the report waiting on it (and
  nothing that is live or done), and the finished study has bit-equal validation losses, the
  same report tables and the same accounting as the local executor;
- slow: the same study with no faults (the parity run the note's wall times come from), a run
  longer than the job time limit (SIGUSR2 -> checkpoint -> requeue -> resume), and one run on
  2 hosts.

Times on the shared 2-core machine (several engineers' tests at once): the default test
80-170 s (its local run a third to half of it); parity ~150 s + the 200 s local fixture; time limit ~630 s
(SLURM holds each requeued job ~2 min); 2 hosts ~150 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster.fixtures import cluster  # noqa: F401  (the module-scoped fixture)
from tests.test_study_e2e import mini_study
from tests.workers.train_common import prepare_data

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent
MAIN = "runs/main-lr0.003-s0"
BRANCH8 = f"{MAIN}/branches/wsd-1-sqrt-f0.25-T8"


def _spec(tmp: Path, data: Path, small: bool = False, **executor) -> Path:
    """The mini study; ``small``: one budget, no SWA (4 jobs: the default suite's)."""
    spec = mini_study(data)
    spec["executor"] = {"time": 10, "cpus_per_task": 1, **executor}
    if small:
        spec["budgets"], spec["arms"] = [8], spec["arms"][:2]
    f = tmp / "mini.yaml"
    f.write_text(yaml.safe_dump(spec))
    return f


def _env(c=None) -> dict[str, str]:
    env = dict(c.env if c is not None else os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=str(REPO),
        MEGAWSD_NO_BAR="1",
    )
    return env


def _study(spec: Path, out: Path, *args: str, env: dict, timeout: float = 900):
    cmd = [sys.executable, "-m", "megawsd.cli", "study", str(spec), "--out", str(out), *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("data") / "stdlib")


@pytest.fixture(scope="module")
def local(tmp_path_factory, data):
    """The mini study with the local executor: the results every SLURM run must equal."""
    tmp = tmp_path_factory.mktemp("local")
    t0 = time.monotonic()
    p = _study(_spec(tmp, data), tmp / "out", "--executor", "local", env=_env())
    assert p.returncode == 0, p.stderr[-4000:]
    return {"out": tmp / "out", "wall_s": time.monotonic() - t0}


def results(out: Path) -> dict:
    """What must be equal between executors: every cell's val loss (bit for bit), the report's
    tables and the compute accounting."""
    res = json.loads((out / "results.json").read_text())
    cells = {(c["variant"], c["budget"], c["lr"], c["seed"]): c["val_loss"] for c in res["cells"]}
    report = (out / "report.md").read_text()
    tables = [line for line in report.splitlines() if line.startswith("|")]
    totals = {k: v for k, v in res["totals"]["total"].items()}
    runs = {r["run"]: (r["planned"], r["executed"]) for r in res["totals"]["runs"]}
    return {"cells": cells, "tables": tables, "totals": totals, "runs": runs}


def _live(cluster, name: str) -> dict[str, tuple[str, str]]:  # noqa: F811
    """squeue: graph key (the job comment) -> (job id, state)."""
    out = cluster.run(["squeue", "-h", "--name", name, "-o", "%i|%k|%T"], timeout=30).stdout
    return {k: (i, s) for i, k, s in (line.split("|") for line in out.split())}


def _wait(cond, timeout: float, what: str, proc=None) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver ended before {what}: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.5)


def _job_name(spec: Path, out: Path) -> str:
    from megawsd.study.plan import make_plan
    from megawsd.study.slurm import study_job_name
    from megawsd.study.spec import load_spec

    return study_job_name(make_plan(load_spec(spec)), out)


def _ledger(out: Path) -> dict[str, list[dict]]:
    try:
        return json.loads((out / "slurm" / "jobs.json").read_text())["jobs"]
    except FileNotFoundError:
        return {}


def test_killed_jobs_and_driver_resume_to_the_local_results(cluster, tmp_path, data):  # noqa: F811
    """The small study (main segments 6 and 8, the T8 branch after segment 6, the report):
    scancel of the queued branch, a requeue of the running main segment and a SIGKILLed
    driver; `--resume` finishes the study, submits no job twice, and equals the local run."""
    spec, out = _spec(tmp_path, data, small=True), tmp_path / "out"
    local = _study(spec, tmp_path / "local", "--executor", "local", env=_env())
    assert local.returncode == 0, local.stderr[-4000:]
    env = _env(cluster)
    name = _job_name(spec, out)
    driver = subprocess.Popen(
        [sys.executable, "-m", "megawsd.cli", "study", str(spec), "--out", str(out)]
        + ["--executor", "slurm"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _wait(lambda: len(_ledger(out)) == 4, 300, "4 jobs submitted", driver)
    # the main's first segment runs; the branch waits for it (afterok)
    seg6 = f"{MAIN}@6"
    _wait(lambda: _live(cluster, name).get(seg6, ("", ""))[1] == "RUNNING", 300, "segment 6")
    live = _live(cluster, name)
    assert live[f"{BRANCH8}@8"][1] == "PENDING"
    cluster.run(["scancel", live[f"{BRANCH8}@8"][0]], timeout=30)
    cluster.scontrol("requeue", live[seg6][0])
    os.killpg(driver.pid, signal.SIGKILL)  # the driver dies; the jobs are SLURM's
    driver.wait()
    # SLURM holds a requeued job for ~2 minutes (its BeginTime; what a requeue costs on a real
    # cluster too): release it so the default suite does not wait
    _wait(lambda: cluster.job_state(int(live[seg6][0])) == "PENDING", 120, "requeued job")
    cluster.scontrol("update", f"JobId={live[seg6][0]}", "StartTime=now")

    p = _study(spec, out, "--resume", "--executor", "slurm", env=env, timeout=1200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert f"resubmitting {BRANCH8}@8 (retry 1 of 2)" in p.stderr, p.stderr[-3000:]
    # the cancelled branch twice (new, retry); the report once more (it waited on the
    # cancelled branch: its afterok could never be met); everything else once
    whys = {k: [s["why"] for s in v] for k, v in _ledger(out).items()}
    assert whys.pop(f"{BRANCH8}@8") == ["new", "retry"]
    assert whys.pop("report") == ["new", "dependency"]
    assert whys == {f"{MAIN}@6": ["new"], f"{MAIN}@8": ["new"]}
    info = cluster.job_info(int(live[seg6][0]))
    assert int(info.get("Restarts", "0")) >= 1, info  # the requeued segment ran again
    assert results(out) == results(tmp_path / "local")


@pytest.mark.slow
def test_slurm_study_equals_local_and_times(cluster, tmp_path, data, local):  # noqa: F811
    """No faults: bit-equal val losses, the same tables and accounting; the wall times and
    job count for the note go to tmp_path/timing.json (and the test's output)."""
    spec, out = _spec(tmp_path, data), tmp_path / "out"
    t0 = time.monotonic()
    p = _study(spec, out, "--executor", "slurm", env=_env(cluster))
    wall = time.monotonic() - t0
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "runs done" in p.stderr  # the progress line
    assert results(out) == results(local["out"])
    jobs = sum(len(v) for v in _ledger(out).values())
    assert jobs == 6
    timing = {"local_s": local["wall_s"], "slurm_s": wall, "jobs": jobs}
    (tmp_path / "timing.json").write_text(json.dumps(timing))
    print("timing", json.dumps(timing))


def _long_spec(tmp: Path, data: Path, steps: int, **executor) -> Path:
    """One cosine run of ``steps`` steps (1500: longer than a 2-minute job on 2 cores)."""
    f = _spec(tmp, data, **executor)
    spec = yaml.safe_load(f.read_text())
    spec.update(budgets=[steps], warmup=10, arms=[{"kind": "cosine"}], name="long")
    spec["base"]["eval"] = {"interval": steps, "batches": 2, "batch_size": 8}
    spec["base"]["checkpoint"] = {"interval": 50, "keep_last": 1}
    f.write_text(yaml.safe_dump(spec))
    return f


@pytest.mark.slow
def test_run_longer_than_the_time_limit_continues_in_requeued_jobs(cluster, tmp_path, data):  # noqa: F811
    """time: 2 minutes, SIGUSR2 30 s before (SLURM may send it up to 60 s early): the job
    checkpoints, submitit requeues it, the requeued job resumes; the final val loss equals
    the uninterrupted local run's."""
    steps = 1500
    spec = _long_spec(tmp_path, data, steps, time=2, signal_delay_s=30)
    p = _study(spec, tmp_path / "local", "--executor", "local", env=_env())
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "slurm"
    p = _study(spec, out, "--executor", "slurm", env=_env(cluster), timeout=1800)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    key = f"runs/cosine-T{steps}-lr0.003-s0@{steps}"
    (sub,) = _ledger(out)[key]
    assert int(cluster.job_info(int(sub["id"]))["Restarts"]) >= 1  # it did hit the limit
    log = (out / "logs" / f"cosine-T{steps}-lr0.003-s0.log").read_text()
    assert "resumed" in log
    assert results(out)["cells"] == results(tmp_path / "local")["cells"]


@pytest.mark.slow
def test_one_run_on_two_hosts(cluster, tmp_path, data):  # noqa: F811
    """nodes: 2 -> one run on both hosts (one rank each) through megawsd train's SLURM launch
    (--hostfile --no-ssh --node-rank); equal to the same run with 2 local ranks."""
    spec = _long_spec(tmp_path, data, 20, nodes=2)
    raw = yaml.safe_load(spec.read_text())
    raw["base"]["micro_batch_size"] = 4  # 2 ranks x 4 = the global batch of 8
    spec.write_text(yaml.safe_dump(raw))
    p = _study(spec, tmp_path / "local", "--executor", "local", "--nproc", "2", env=_env())
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "slurm"
    env = _env(cluster)  # nothing network-related set by hand (megawsd.train.netif)
    env.pop("GLOO_SOCKET_IFNAME", None)
    p = _study(spec, out, "--executor", "slurm", env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    (sub,) = _ledger(out)["runs/cosine-T20-lr0.003-s0@20"]
    info = cluster.job_info(int(sub["id"]))
    assert info["NumNodes"] == "2", info
    assert (out / "logs" / "cosine-T20-lr0.003-s0.node1.log").exists()
    assert results(out)["cells"] == results(tmp_path / "local")["cells"]


def _study_cpu_cut(tmp: Path, data: Path) -> Path:
    """configs/study-cpu.yaml with every arm kind kept (cosine, WSD 1-sqrt/linear and 10%,
    schedule-free with a cooldown, constant, SWA, EMA), cut to minutes: budgets 20 and 40
    steps, one LR per arm, the small test corpus."""
    spec = yaml.safe_load((REPO / "configs" / "study-cpu.yaml").read_text())
    spec.pop("data")
    spec.pop("out")
    spec["base"].update(data=str(data), seq_len=32, global_batch_size=8, micro_batch_size=8)
    spec["base"]["eval"] = {"interval": 10, "batches": 2, "batch_size": 8}
    spec.update(budgets=[20, 40], warmup=4, lrs=[2e-3])
    for arm in spec["arms"]:
        if arm["kind"] == "schedule-free":
            arm["lrs"] = [4e-3]
        if arm["kind"] in ("swa", "ema"):
            arm["every"] = 2
    spec["executor"] = {"time": 10, "cpus_per_task": 1}
    f = tmp / "study-cpu-cut.yaml"
    f.write_text(yaml.safe_dump(spec))
    return f


@pytest.mark.slow
def test_study_cpu_cut_equals_local(cluster, tmp_path, data):  # noqa: F811
    """Every arm kind of the shipped CPU study, local vs SLURM: bit-equal val losses, the same
    report tables and accounting; wall times and job count in tmp_path/timing.json."""
    spec = _study_cpu_cut(tmp_path, data)
    t0 = time.monotonic()
    p = _study(spec, tmp_path / "local", "--executor", "local", env=_env(), timeout=1800)
    local_s = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    t0 = time.monotonic()
    p = _study(spec, tmp_path / "slurm", "--executor", "slurm", env=_env(cluster), timeout=1800)
    slurm_s = time.monotonic() - t0
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert results(tmp_path / "slurm") == results(tmp_path / "local")
    jobs = sum(len(v) for v in _ledger(tmp_path / "slurm").values())
    timing = {"local_s": local_s, "slurm_s": slurm_s, "jobs": jobs}
    (tmp_path / "timing.json").write_text(json.dumps(timing))
    print("timing", json.dumps(timing))
