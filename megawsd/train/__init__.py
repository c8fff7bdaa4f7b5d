"""megawsd.train: run config, training loop, checkpoints, cooldown branches, launchers.

- ``config``: ``load_config(path, overrides) -> RunConfig`` (pydantic, validated, "did you
  mean"); ``RunConfig.resolved()`` is what ``RUN/config.yaml`` holds.
- ``model``: Llama-style presets (tiny, demo, 20m, 125m, 350m, 1b, 7b) or a config.json.
- ``loop``: ``train(cfg, run_dir)``, one rank's loop (needs torch.distributed initialised).
- ``checkpoint``: atomic DeepSpeed + megawsd-state checkpoints, resume, retention.
- ``branch``: ``plan(parent, at, decay, ...)`` / ``create(plan)``: cooldown branch dirs.
- ``launcher``: the DeepSpeed launcher command, in-process rank setup, signal forwarding.
- ``rundir``: the run directory format (docs/run_directory.md).
- ``python -m megawsd.train CONFIG``: what every rank runs.
"""
