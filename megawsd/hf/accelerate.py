"""Accelerate with megawsd: route DeepSpeed's engine creation through megawsd.

accelerate builds the DeepSpeed engine inside ``Accelerator.prepare`` by calling
``deepspeed.initialize``, which cannot build ``ScheduleFreeAdamW``/``WSD`` sections and knows
nothing of schedule-free evaluation weights. :func:`route_initialize` makes that call go to
``megawsd.deepspeed.initialize`` (same arguments, same 4-tuple) for the duration of a
``prepare``; :func:`prepare` is ``Accelerator.prepare`` inside it::

    from accelerate import Accelerator
    from accelerate.utils import DummyOptim, DummyScheduler
    import megawsd.hf as mhf

    acc = Accelerator()                      # DeepSpeed plugin from `accelerate launch`
    opt = DummyOptim(model.parameters())     # the JSON holds "ScheduleFreeAdamW"
    sched = DummyScheduler(opt)              # the JSON holds "WSD"
    model, opt, loader, sched = mhf.prepare(acc, model, opt, loader, sched)
    ...
    with mhf.eval_weights(model, opt):       # x, on every rank
        evaluate(model)
    state = mhf.x_state_dict(model, opt)     # rank 0 (DeepSpeed) / every rank (DDP)

accelerate looks ``deepspeed.initialize`` up at call time (pinned by
tests/test_hf_trainer.py::test_accelerate_calls_deepspeed_initialize_by_name); if a release
stops doing so, :func:`prepare` raises instead of training without megawsd's hooks.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

from megawsd.errors import ConfigError
from megawsd.hf.weights import is_megawsd_engine
from megawsd.integrations.deepspeed import engine_eval, engine_train, initialize


@contextlib.contextmanager
def route_initialize(
    on_call: Callable[[dict], dict] | None = None,
    on_engine: Callable[[object], None] | None = None,
) -> Iterator[list]:
    """Inside, ``deepspeed.initialize(...)`` is ``megawsd.deepspeed.initialize(...)``.

    ``on_call(kwargs) -> kwargs`` may edit the arguments first; ``on_engine(engine)`` sees each
    engine made. Yields the list of engines made inside.
    """
    import deepspeed

    original = deepspeed.initialize
    engines: list = []

    @functools.wraps(original)
    def routed(*args, **kwargs):
        if on_call is not None:
            kwargs = on_call(kwargs)
        # megawsd's initialize calls deepspeed.initialize itself: the original, not us.
        deepspeed.initialize = original
        try:
            out = initialize(*args, **kwargs)
        finally:
            deepspeed.initialize = routed
        engines.append(out[0])
        if on_engine is not None:
            on_engine(out[0])
        return out

    deepspeed.initialize = routed
    try:
        yield engines
    finally:
        deepspeed.initialize = original


def adopt_optimizer(optimizer, engine) -> None:
    """Make accelerate's optimizer wrapper's ``eval()``/``train()`` move the engine's weights.

    accelerate forwards them to the innermost optimizer, which under ZeRO holds flat fp32
    partitions: schedulefree's swap there would corrupt the masters (stages 1-2) or do nothing
    (stage 3) -- accelerate issue #4159. Here they become megawsd's engine_eval/engine_train.
    """
    if optimizer is None or getattr(optimizer, "_megawsd_adopted", None) is engine:
        return
    optimizer.eval = functools.partial(engine_eval, engine)
    optimizer.train = functools.partial(engine_train, engine)
    optimizer._megawsd_adopted = engine


def prepare(accelerator, *objects, **kwargs):
    """``accelerator.prepare(*objects)`` with DeepSpeed engines made by megawsd."""
    if accelerator.distributed_type != "DEEPSPEED":  # a str enum in accelerate
        return accelerator.prepare(*objects, **kwargs)
    with route_initialize():
        out = accelerator.prepare(*objects, **kwargs)
    seq = out if isinstance(out, tuple) else (out,)
    engine = next((o for o in seq if is_megawsd_engine(o)), None)
    if engine is None and any(_is_ds_engine(o) for o in seq):
        raise ConfigError(
            "accelerate = installed version: it built the DeepSpeed engine without calling "
            "deepspeed.initialize by name, so megawsd could not install its hooks; pin "
            "accelerate to a version tested with megawsd (see docs/hf.md)"
        )
    if engine is not None:
        from accelerate.optimizer import AcceleratedOptimizer

        for o in seq:
            if isinstance(o, AcceleratedOptimizer):
                adopt_optimizer(o, engine)
    return out


def _is_ds_engine(obj) -> bool:
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, DeepSpeedEngine)
