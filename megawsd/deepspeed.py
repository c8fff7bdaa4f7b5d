"""``megawsd.deepspeed``: the DeepSpeed entry points under a short name.

    from megawsd import deepspeed as mds
    engine, optimizer, _, scheduler = mds.initialize(model=model, config="ds.json")
    with mds.eval_mode(engine):
        val_loss = evaluate(engine)
    weights = mds.consolidated_state_dict(engine, weights="x")   # rank 0

See :mod:`megawsd.integrations.deepspeed` and :mod:`megawsd.integrations.ds_checkpoint`.
"""

from megawsd.integrations.deepspeed import (
    consolidate_checkpoint,
    consolidated_state_dict,
    engine_eval,
    engine_train,
    eval_mode,
    full_param_tensors,
    initialize,
    is_schedule_free_type,
    load_checkpoint,
    read_full_checkpoint,
)

__all__ = [
    "initialize",
    "eval_mode",
    "engine_eval",
    "engine_train",
    "consolidated_state_dict",
    "consolidate_checkpoint",
    "load_checkpoint",
    "read_full_checkpoint",
    "full_param_tensors",
    "is_schedule_free_type",
]
