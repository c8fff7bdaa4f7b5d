"""``python -m megawsd.train CONFIG``: one rank of a run (what the launchers start).

    deepspeed --num_gpus 8 --module megawsd.train configs/llama-1b.yaml
    deepspeed --hostfile hosts --module megawsd.train configs/llama-7b.yaml --run-dir runs/7b
    torchrun --nproc_per_node 8 -m megawsd.train configs/llama-1b.yaml

`megawsd train` builds and runs these commands for you; this module is what runs inside
each rank (it also runs a single rank in-process when nothing launched it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from megawsd.errors import MegawsdError
from megawsd.train.config import load_config
from megawsd.train.launcher import (
    already_launched,
    init_distributed,
    remove_shm_buffers,
    watch_parent,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m megawsd.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="run config YAML")
    p.add_argument(
        "--run-dir",
        default=None,
        help="run directory (default: config's run_dir or runs/<config name>)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="require a checkpoint to continue from (rerunning resumes anyway)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optimizer.lr=1e-3 (repeatable)",
    )
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # passed by the DeepSpeed launcher
    return p.parse_args(argv)


def _dist_timeout(args: argparse.Namespace) -> float | None:
    """stability.dist_timeout_s of the config (needed before the process group exists);
    a config error is reported after joining, like every other error."""

    try:
        return load_config(args.config, args.overrides).stability.dist_timeout_s
    except MegawsdError:
        return None


# torch deprecations of collectives that DeepSpeed calls (not megawsd): every rank of every
# run printed them, and nothing a user can do removes them. Matched by message and by where
# torch issues them (its c10d_logger wrapper), so any other warning still shows.
_THIRD_PARTY_DEPRECATIONS = (
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor|_all_gather_base|"
    r"_reduce_scatter_base)` (is deprecated|is a private function)"
)


def quiet_third_party_deprecations() -> None:
    """Keep the deprecation notices of torch APIs that DeepSpeed uses out of the console."""
    warnings.filterwarnings(
        "ignore",
        message=_THIRD_PARTY_DEPRECATIONS,
        category=FutureWarning,
        module=r"torch\.distributed\.",
    )


def _configure_logging(rank: int) -> None:
    """Rank 0 logs at INFO, the others at WARNING; the first rank of every host also says
    which network interface it chose (the line that explains a multi-host launch)."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    if os.environ.get("LOCAL_RANK", "0") == "0":
        logging.getLogger("megawsd.train.netif").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_third_party_deprecations()
    alone = not already_launched()  # a world of one that this process sets up itself
    _configure_logging(int(os.environ.get("RANK", "0")))
    watch_parent()  # ranks launched by `megawsd train` never outlive it
    rank = init_distributed(_dist_timeout(args))
    _configure_logging(rank)
    from megawsd.train.run import run_from_args

    try:
        return run_from_args(args.config, args.run_dir, args.overrides, args.resume)
    except MegawsdError as err:
        print(f"megawsd train: error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        if alone:  # no launcher cleans up after a world of one (DeepSpeed never unlinks them)
            remove_shm_buffers(int(os.environ["MASTER_PORT"]))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
