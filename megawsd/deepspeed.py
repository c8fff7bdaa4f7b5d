"""``megawsd.deepspeed``: the DeepSpeed entry points under a short name.

    from megawsd import deepspeed as mds
    engine, optimizer, _, scheduler = mds.initialize(model=model, config="ds.json")
    with mds.eval_mode(engine):
        val_loss = evaluate(engine)
    weights = mds.consolidated_state_dict(engine, weights="x")   # rank 0

See :mod:`megawsd.integrations.deepspeed` and :mod:`megawsd.integrations.ds_checkpoint`.
"""

from megawsd.integrations.deepspeed import *  # noqa: F403  (the public names, one list)
from megawsd.integrations.deepspeed import __all__  # noqa: F401
