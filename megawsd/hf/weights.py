"""Schedule-free evaluation weights x for Hugging Face models, with or without DeepSpeed.

Schedule-free AdamW trains at y and evaluates at x = (y - (1-β1) z)/β1. Two cases:

- a DeepSpeed engine made by ``megawsd.deepspeed.initialize``: ``megawsd.deepspeed.eval_mode``
  writes x into ZeRO's working weights from the fp32 masters and restores y bit-exactly;
- plain torch (one process, DDP): the parameters *are* y. ``optimizer.eval()``/``train()`` of
  the stock optimizer swap them with two lerps, which does not give y back bit for bit, so here
  y is stashed and copied back instead. x is computed with the same kernel as under DeepSpeed.

Both are collective where the model is sharded: every rank must enter and leave together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megawsd.errors import field_error
from megawsd.integrations.deepspeed import consolidated_state_dict, megawsd_state
from megawsd.integrations.deepspeed import eval_mode as ds_eval_mode
from megawsd.integrations.deepspeed import looks_schedule_free as ds_looks_schedule_free
from megawsd.kernels import write_x


def unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or the object itself)."""
    seen = 0
    while optimizer is not None and not _has_groups(optimizer) and seen < 4:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer


def _has_groups(opt) -> bool:
    return isinstance(opt, torch.optim.Optimizer)


def looks_schedule_free(optimizer) -> bool:
    """Any schedule-free optimizer (megawsd's, schedulefree's AdamW / RAdam / SGD ...), also
    inside accelerate's AcceleratedOptimizer (the test is megawsd.deepspeed's); which of them
    megawsd can evaluate at x is :func:`check_x_known`'s question."""
    return ds_looks_schedule_free(unwrap_optimizer(optimizer))


# The schedule-free optimizers whose parameters hold y in train mode and whose eval() is
# p.lerp_(z, 1 - 1/β), i.e. x = (y - (1-β) z)/β, with β their ``betas[0]`` (AdamW, RAdam) or
# ``momentum`` (SGD): transformers' optim="schedule_free_adamw" / "_radam" / "_sgd". Others
# with the same group keys keep x or y elsewhere (schedulefree's *Closure, *Reference,
# ScheduleFreeWrapper) and are refused by name.
_X_BETA_KEY = {
    ("megawsd.optim.schedule_free", "ScheduleFreeAdamW"): "betas",
    ("schedulefree.adamw_schedulefree", "AdamWScheduleFree"): "betas",
    ("schedulefree.radam_schedulefree", "RAdamScheduleFree"): "betas",
    ("schedulefree.sgd_schedulefree", "SGDScheduleFree"): "momentum",
}


def _innermost(optimizer):
    """The optimizer under every wrapper (accelerate's AcceleratedOptimizer is itself a
    torch Optimizer sharing the inner one's groups: its type says nothing about x)."""
    opt = unwrap_optimizer(optimizer)
    for _ in range(4):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        opt = inner
    return opt


def check_x_known(optimizer) -> None:
    """Refuse, by name, a schedule-free optimizer whose x megawsd does not know how to form
    (a no-op for the supported ones and for optimizers that are not schedule-free)."""
    opt = _innermost(optimizer)
    if not looks_schedule_free(opt) or _x_beta_key(opt) is not None:
        return
    known = ", ".join(name for _, name in _X_BETA_KEY)
    raise field_error(
        "optimizer",
        type(opt).__name__,
        f"megawsd evaluates and saves schedule-free runs at x and knows x only for {known} "
        "(transformers' optim='schedule_free_adamw', 'schedule_free_radam', "
        "'schedule_free_sgd'); use one of them",
    )


def _x_beta_key(opt) -> str | None:
    for cls in type(_innermost(opt)).__mro__:  # subclasses keep their base's update
        key = _X_BETA_KEY.get((cls.__module__, cls.__name__))
        if key is not None:
            return key
    return None


def x_beta(opt, group: dict) -> float:
    """β of x = (y - (1-β) z)/β for one group of a supported optimizer."""
    key = _x_beta_key(opt)
    if key is None:
        check_x_known(opt)
    return float(group["betas"][0] if key == "betas" else group["momentum"])


def is_megawsd_engine(model) -> bool:
    """A DeepSpeed engine with megawsd's hooks (made by megawsd.deepspeed.initialize)."""
    return megawsd_state(model) is not None


@contextlib.contextmanager
def torch_eval_weights(optimizer) -> Iterator[None]:
    """Parameters hold x inside, y (bit-exact) after; for un-sharded models (one process, DDP).

    Groups already in eval mode (parameters hold x) are left alone. A ``step()`` inside raises
    (the groups are marked eval, as ``optimizer.eval()`` does).
    """
    opt = unwrap_optimizer(optimizer)
    if not looks_schedule_free(opt):
        yield
        return
    check_x_known(opt)
    stash: list[tuple[torch.Tensor, torch.Tensor]] = []
    swapped = []
    with torch.no_grad():
        for group in opt.param_groups:
            if not group["train_mode"]:
                continue
            beta1 = x_beta(opt, group)
            for p in group["params"]:
                z = opt.state.get(p, {}).get("z")
                if z is None:
                    continue  # never stepped: x == y
                y = p.detach().clone()
                stash.append((p, y))
                write_x(y, z.to(p.device), beta1, p.data)
            group["train_mode"] = False
            swapped.append(group)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, y in stash:
                p.data.copy_(y)
        for group in swapped:
            group["train_mode"] = True


@contextlib.contextmanager
def eval_weights(model, optimizer=None) -> Iterator[None]:
    """x in the model inside, y after: a megawsd DeepSpeed engine or a torch model + optimizer.

    Puts the module in ``eval()`` for DeepSpeed engines (as ``megawsd.deepspeed.eval_mode``
    does); the caller owns ``model.eval()`` otherwise.
    """
    if is_megawsd_engine(model):
        with ds_eval_mode(model):
            yield
    elif optimizer is not None:
        with torch_eval_weights(optimizer):
            yield
    else:
        yield


def x_state_dict(model, optimizer=None) -> dict[str, torch.Tensor]:
    """A full state dict of the model with x for every trainable parameter, for
    ``save_pretrained(state_dict=...)``; on rank 0 (empty elsewhere) for DeepSpeed engines.

    Collective for DeepSpeed engines. Tied aliases (``lm_head.weight``) are included, frozen
    parameters and persistent buffers keep their values, dtypes are the model's.
    """
    if is_megawsd_engine(model):
        return _engine_x_state_dict(model)
    module = getattr(model, "module", model)  # DDP
    with torch_eval_weights(optimizer):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _engine_x_state_dict(engine) -> dict[str, torch.Tensor]:
    xs = consolidated_state_dict(engine, weights="x")  # rank 0: trainable params, fp32
    module = engine.module
    rest = _gather_rest(engine)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank != 0:
        return {}
    canonical = {}  # id(param) -> the name consolidated_state_dict uses
    for name, p in module.named_parameters():
        canonical.setdefault(id(p), name)
    out = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        src = canonical[id(p)]
        if src in xs:
            out[name] = xs[src].to(p.dtype)
    for name, t in rest.items():
        out.setdefault(name, t)
    return out


def _gather_rest(engine) -> dict[str, torch.Tensor]:
    """Frozen parameters (gathered under ZeRO-3) and persistent buffers of the module."""
    import deepspeed

    module = engine.module
    frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
    out: dict[str, torch.Tensor] = {}
    gathered = [p for _, p in frozen if hasattr(p, "ds_id")]
    ctx = deepspeed.zero.GatheredParameters(gathered) if gathered else contextlib.nullcontext()
    with ctx:
        for n, p in frozen:
            out[n] = p.detach().clone().cpu()
    params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    for name, t in module.state_dict().items():
        if name not in params:  # a persistent buffer
            out[name] = t.detach().clone().cpu()
    return out
