"""Worker (1 rank): the stage-0 order of the step gate and megawsd's step hook, and the
loop's engine.step() calls against DeepSpeed's accumulation boundary.

order: a tiny Llama under stage 0 fp32 with schedule-free AdamW (megawsd.deepspeed.initialize
installs its step-id hook on the optimizer's ``step``), then a StepGate on the same attribute;
three steps, the second vetoed. Reports which step ids the hook set, whether the vetoed step
left parameters and optimizer state bit-identical, and the counters.

loop: megawsd.train.loop.train on a 3-step tiny run (gradient accumulation 4) with a spy on
``engine.step`` that records ``engine.is_gradient_accumulation_boundary()`` at each call.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megawsd.train.launcher import init_distributed  # noqa: E402

init_distributed()

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from megawsd.integrations import ds_layout  # noqa: E402
from megawsd.integrations.deepspeed import initialize  # noqa: E402
from megawsd.train import loop  # noqa: E402
from megawsd.train.config import load_config  # noqa: E402
from megawsd.train.guard import StepGate  # noqa: E402
from tests.dist_helpers import report, run_worker, worker_args  # noqa: E402
from tests.workers.train_common import write_config  # noqa: E402


def snapshot(engine, inner):
    params = [p.detach().clone() for p in engine.module.parameters()]
    state = [
        {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
        for st in inner.state.values()
    ]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    return params, state, groups


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


def order() -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 0},
        "optimizer": {"type": "ScheduleFreeAdamW", "params": {"lr": 1e-2, "backend": "foreach"}},
    }
    engine, *_ = initialize(model=model, config=ds, model_parameters=model.parameters())
    inner = ds_layout.inner_optimizer(engine)
    hook = inner.step
    res = {"hook_installed": engine.optimizer is inner and "step" in vars(inner)}
    ids: list[int] = []
    set_step_id = inner.set_step_id

    def spy(step_id):
        ids.append(step_id)
        return set_step_id(step_id)

    inner.set_step_id = spy
    gate = StepGate(engine)
    res["gate_wraps_hook"] = gate.wrapped is hook
    gen = torch.Generator().manual_seed(1)
    res.update(applied=[], step_ids=[])
    for step in range(3):
        batch = torch.randint(0, 96, (2, 17), generator=gen)
        engine.backward(engine(input_ids=batch[:, :-1], labels=batch[:, 1:]).loss)
        before = snapshot(engine, inner)
        ids.clear()
        gate.arm(lambda norm, step=step: step != 1)
        engine.step()
        gate.disarm()
        res["applied"].append(gate.applied)
        res["step_ids"].append(list(ids))
        if step == 1:
            res["unchanged_when_vetoed"] = same(before, snapshot(engine, inner))
    res["k"] = inner.param_groups[0]["k"]
    res["global_steps"] = engine.global_steps
    return res


def loop_steps(tmp: Path, data: Path) -> dict:
    cfg = load_config(
        str(
            write_config(
                tmp / "run.yaml",
                data,
                steps=3,
                checkpoint={"interval": 0, "save_final": False},
                eval={"batches": 0},
            )
        ),
        [],
    )
    rec = {"boundary": []}
    build_engine = loop.build_engine

    def spied(*args, **kwargs):
        engine, *rest = build_engine(*args, **kwargs)
        step = engine.step

        def recorded(*a, **k):
            rec["boundary"].append(engine.is_gradient_accumulation_boundary())
            return step(*a, **k)

        engine.step = recorded
        rec["engine"] = engine
        return (engine, *rest)

    loop.build_engine = spied
    assert loop.train(cfg, tmp / "run") == 0
    engine = rec.pop("engine")
    return {
        **rec,
        "gas": engine.gradient_accumulation_steps(),
        "steps": cfg.total_steps,
        "micro_steps": engine.micro_steps,
        "global_steps": engine.global_steps,
    }


def main():
    args = worker_args()
    report({"order": order(), "loop": loop_steps(Path(args["tmp"]), Path(args["data"]))})


run_worker(main)
