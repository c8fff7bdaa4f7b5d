"""Worker (2 ranks): the step gate and the per-group statistics on ZeRO stages 0-3.

For every stage, a tiny Llama under DeepSpeed (fp32, AdamW or schedule-free, clipping 1.0):
step 1 applied, step 2 vetoed by the gate (the monitor says skip), step 3 with a NaN
gradient on rank 0 only, step 4 applied. Reports the guard's grad norms and outcomes, whether
parameters and optimizer state stayed bit-identical across the vetoed and NaN steps, the
per-group update RMS of step 1, and a plain-torch oracle of that update RMS on stage 0.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megawsd.train.launcher import init_distributed  # noqa: E402

init_distributed()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from megawsd.integrations.deepspeed import initialize  # noqa: E402
from megawsd.train.faults import Fault, Faults  # noqa: E402
from megawsd.train.guard import StabilityGuard  # noqa: E402
from megawsd.train.stability import SpikeRule, StabilityConfig, param_group  # noqa: E402
from tests.dist_helpers import report, worker_args  # noqa: E402

args = worker_args()
rank, world = dist.get_rank(), dist.get_world_size()


def full_params(engine):
    """Every parameter, whole (gathered at stage 3), in name order."""
    from megawsd.integrations.deepspeed import full_param_tensors

    return {k: v.clone() for k, v in full_param_tensors(engine).items()}


def opt_state(engine):
    from megawsd.integrations import ds_layout

    inner = ds_layout.inner_optimizer(engine)
    out = []
    for g in inner.param_groups:
        out.append({k: v for k, v in g.items() if k in ("k", "weight_sum", "step")})
    for st in inner.state.values():
        for k, v in sorted(st.items()):
            out.append((k, v.clone() if torch.is_tensor(v) else v))
    return out


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


out = {}
for stage, opt_type in args["combos"]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    )
    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2 * world,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "optimizer": {"type": opt_type, "params": {"lr": 1e-2, "weight_decay": 0.1}},
    }
    if opt_type == "AdamW":
        ds.pop("optimizer")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        ds["zero_allow_untested_optimizer"] = True
    else:
        optimizer = None
    engine, *_ = initialize(
        model=model,
        optimizer=optimizer,
        config=ds,
        model_parameters=model.parameters() if optimizer is None else None,
    )
    cfg = StabilityConfig(warmup_steps=0, nan={"action": "skip"})
    guard = StabilityGuard(
        cfg, engine, rank=rank, world=world, faults=Faults([Fault("nan_grad", 2, None, 0)], rank)
    )
    gen = torch.Generator().manual_seed(100 + rank)
    res = {"norms": [], "actions": [], "applied": [], "events": []}
    for step in range(4):
        batch = torch.randint(0, 96, (2, 17), generator=gen)
        guard.begin_step(step)
        index = guard.batch_index(step)
        loss = engine(input_ids=batch[:, :-1], labels=batch[:, 1:]).loss
        loss = guard.fault_loss(loss, step)  # batch index == step here: nan_grad@2 -> step 3
        engine.backward(loss)
        if step == 1:  # force a veto: any loss is a "spike" whose action is skip
            saved = guard.monitor.state_dict()
            guard.monitor.cfg = cfg.model_copy(
                update={"loss_spike": SpikeRule(k=1.0, min_rel=0, action="skip")}
            )
            guard.monitor.loss.count, guard.monitor.loss.mean = 5, -100.0
        if step in (1, 2):
            before_p, before_s = full_params(engine), opt_state(engine)
        if stage == 0 and step == 0 and rank == 0:
            oracle_before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        guard.before_step(step, loss.detach(), False, 1e-2)
        engine.step()
        o = guard.after_step()
        if step == 1:
            guard.monitor.cfg = cfg
            guard.monitor.load_state_dict(saved)
        if step in (1, 2):
            res[f"unchanged_{step}"] = same(before_p, full_params(engine)) and same(
                before_s, opt_state(engine)
            )
        if step == 0:
            res["stats"] = o.stats
            if stage == 0 and rank == 0:
                sums = {}
                for n, p in engine.module.named_parameters():
                    g = param_group(n)
                    d = p.detach().double() - oracle_before[n].double()
                    a = sums.setdefault(g, [0.0, 0.0, 0])
                    a[0] += d.pow(2).sum().item()
                    a[1] += p.detach().double().pow(2).sum().item()
                    a[2] += p.numel()
                res["oracle"] = {f"update_rms/{g}": (a[0] / a[2]) ** 0.5 for g, a in sums.items()}
                res["oracle"].update(
                    {f"param_rms/{g}": (a[1] / a[2]) ** 0.5 for g, a in sums.items()}
                )
        res["norms"].append(o.grad_norm)
        res["actions"].append(o.action)
        res["applied"].append(o.applied)
        res["events"].append([(e.type, e.action, e.detail.get("skipped_by")) for e in o.events])
    res["skipped_steps"] = engine.skipped_steps
    res["global_steps"] = engine.global_steps
    out[f"z{stage}-{opt_type}"] = res
report(out)
