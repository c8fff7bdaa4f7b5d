"""Export a run or branch checkpoint to a transformers model directory (safetensors).

    megawsd export runs/main/branches/cooldown-4000-d800-1sqrt --out hf/cooldown
    megawsd export runs/main --step 4000 --out hf/main-4000
    megawsd export runs/main --average cooldown-a,cooldown-b@4800 --out hf/soup

The directory loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)``. Schedule-free runs are exported at x (the weights
they are evaluated at) unless ``--weights y``. ``--average`` builds a model soup: the uniform
average of the listed runs' weights (paths, or branch names under RUN/branches, each
optionally ``@STEP``; ``.`` is RUN itself), after checking they share one architecture.
The run directory is never written to.
"""

from __future__ import annotations

import argparse

from megawsd.analysis.export import export
from megawsd.errors import field_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run", metavar="RUN_OR_BRANCH", help="run or branch directory")
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument(
        "--step",
        type=int,
        default=None,
        help="checkpoint step (default: the run's latest checkpoint)",
    )
    parser.add_argument(
        "--weights",
        choices=("x", "y"),
        default="x",
        help="schedule-free weights to export: x (default, evaluation) or y",
    )
    parser.add_argument(
        "--average",
        default=None,
        metavar="A,B,C",
        help="average these runs/branches (PATH or NAME, optionally @STEP)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument(
        "--model-config",
        default=None,
        help="transformers config.json of the model, when the run has none",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:

    average = None
    if args.average is not None:
        average = [a for a in args.average.split(",") if a.strip()]
        if not average:
            raise field_error(
                "--average", args.average, "give comma-separated run paths or branch names"
            )
    result = export(
        args.run,
        args.out,
        step=args.step,
        weights=args.weights,
        average=average,
        force=args.force,
        dtype=args.dtype,
        model_config=args.model_config,
    )
    what = (
        "average of " + ", ".join(result.members) if len(result.members) > 1 else result.members[0]
    )
    print(f"exported {what} ({result.weights} weights) to {result.out}")
    if result.tokenizer == "hf":
        print("tokenizer: AutoTokenizer.from_pretrained works (tokenizer.json + tokenizer.model)")
    for note in result.notes:
        print(f"note: {note}")
    return 0
