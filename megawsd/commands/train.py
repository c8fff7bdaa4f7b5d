"""Train a model from a run config on DeepSpeed.

    megawsd train configs/demo-cpu.yaml --nproc 2
    megawsd train configs/llama-1b.yaml --hostfile hosts --run-dir runs/1b
    megawsd train configs/demo-cpu.yaml --set optimizer.lr=1e-3 --set steps=400

With --nproc/--hostfile the DeepSpeed launcher starts the ranks; inside an existing launch
(deepspeed, torchrun, srun + launcher) or with one rank it runs in this process. Rerunning the
same command continues from the run's latest checkpoint. SIGTERM/SIGINT: the ranks finish the
step, save a checkpoint and exit 0.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from megawsd.errors import ConfigError
from megawsd.train import launcher
from megawsd.train.__main__ import main, parse_args
from megawsd.train.config import load_config
from megawsd.train.netif import HOSTS_LOCAL_ENV
from megawsd.train.preflight import launch_world_size, preflight


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("config", help="run config YAML (see configs/)")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="ranks per node (GPUs; CPU processes on a CPU-only machine)",
    )
    parser.add_argument("--hostfile", default=None, help="DeepSpeed hostfile for multi-node")
    parser.add_argument("--run-dir", default=None, help="run directory (default: runs/<name>)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="require a checkpoint to continue (rerunning resumes anyway)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable)",
    )
    parser.add_argument("--master-port", type=int, default=None)
    parser.add_argument("--master-addr", default=None)
    parser.add_argument(
        "--node-rank",
        type=int,
        default=None,
        help="with --no-ssh: this node's index in the hostfile",
    )
    parser.add_argument(
        "--no-ssh",
        action="store_true",
        help="start only this node's ranks (SLURM, or one command per node)",
    )


def check_launch_args(args: argparse.Namespace) -> None:
    """Numbers argparse accepts but that mean nothing (0 or -1 ranks, port 0): refused here,
    before DeepSpeed is handed ``--num_gpus -1`` or the batch layout divides by zero."""

    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc < 1:
        raise ConfigError(
            f"--nproc = {nproc}: give the number of ranks per node, at least 1 "
            "(omit it for one rank per GPU, or one process on a CPU machine)"
        )
    port = getattr(args, "master_port", None)
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(
            f"--master-port = {port}: give a TCP port in 1..65535 (omit it to pick a free one)"
        )
    node_rank = getattr(args, "node_rank", None)
    if node_rank is not None and node_rank < 0:
        raise ConfigError(
            f"--node-rank = {node_rank}: give this node's index in the hostfile (0, 1, ...)"
        )


def run(args: argparse.Namespace) -> int:
    from megawsd.train.run import default_run_dir

    check_launch_args(args)
    cfg = load_config(args.config, args.overrides)  # fail here, before any rank starts
    preflight(cfg, args.config, launch_world_size(args.nproc, args.hostfile, _devices))
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg, args.config)
    module_args = [str(args.config), "--run-dir", str(run_dir)]
    for item in args.overrides:
        module_args += ["--set", item]
    if args.resume:
        module_args.append("--resume")
    return launch_or_run(
        module_args,
        run_dir,
        nproc=args.nproc,
        hostfile=args.hostfile,
        master_port=args.master_port,
        master_addr=args.master_addr,
        node_rank=args.node_rank,
        no_ssh=args.no_ssh,
        check_world=lambda n: cfg.check_layout(n),
    )


def launch_or_run(
    module_args: list[str],
    run_dir: Path,
    *,
    nproc=None,
    hostfile=None,
    master_port=None,
    master_addr=None,
    node_rank=None,
    no_ssh=False,
    check_world=None,
) -> int:
    """Shared by `megawsd train` and `megawsd branch`."""

    if nproc is None and hostfile is None and (launcher.already_launched() or _devices() <= 1):
        return main(module_args)
    if nproc is None and hostfile is None:
        nproc = _devices()
    if check_world is not None and hostfile is None:
        check_world(nproc)
    hosts_local = False
    if hostfile:
        master_addr, hosts_local = launcher.master_address(hostfile, master_addr, no_ssh)
    _prebuild(module_args)
    cmd = launcher.launcher_command(
        module_args,
        nproc=nproc,
        hostfile=hostfile,
        master_port=master_port,
        master_addr=master_addr,
        node_rank=node_rank,
        no_ssh=no_ssh,
    )
    env = launcher.launch_env(nproc or 1)
    if hosts_local:  # several "nodes" on this one machine: loopback is right for them
        env[HOSTS_LOCAL_ENV] = "1"
    with tempfile.TemporaryDirectory(prefix="megawsd-launch-") as tmp:
        if hostfile and not no_ssh:  # pdsh: what the other hosts' ranks need, ssh keepalive
            env = launcher.multinode_env(env, Path(tmp))
        return launcher.run_launcher(cmd, env, run_dir / "run.json")


def _prebuild(module_args: list[str]) -> None:
    """The JIT-built C++ ops the ranks will load, built once here before they start."""
    from megawsd.train import jit_ops  # torch and DeepSpeed: only when launching ranks

    args = parse_args(module_args)
    jit_ops.prebuild(load_config(args.config, args.overrides))


def _devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1
