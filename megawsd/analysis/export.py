"""Export a run's checkpoint (or a soup of several) to a transformers model directory.

    DIR/model.safetensors, config.json, generation_config.json   save_pretrained
    DIR/tokenizer.json, tokenizer_config.json                    AutoTokenizer.from_pretrained
    DIR/tokenizer.model                                          the sentencepiece original
    DIR/megawsd_export.json                                      where the weights came from

Weights: the DeepSpeed checkpoint is consolidated offline by
``megawsd.deepspeed.consolidate_checkpoint`` (any ZeRO stage, any world size). For
schedule-free runs the default is x, the averaged iterate the model is evaluated at; y (the
gradient point) is what the optimizer holds in the parameters and evaluates worse. For
other optimizers x and y are the same tensor.

Architecture: the transformers config the run trained with, read from ``model_config.json``
(or ``config.json``) in the checkpoint or run directory, never rebuilt from megawsd.train's
presets: analysis reads run directories only. ``model_config=`` overrides it.

The run directory is only read. The output is written to a temporary sibling of ``out`` and
renamed into place, so a failed export never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megawsd import __version__
from megawsd.analysis.runs_tree import RunNode, load_run
from megawsd.errors import CheckpointError, field_error
from megawsd.rundir import CHECKPOINTS, checkpoint_dir, tag_for

log = logging.getLogger(__name__)

MODEL_CONFIG_NAMES = ("model_config.json", "config.json", "hf_config.json")

# config fields that do not change the architecture (compared when averaging)
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
}
_SAMPLE_TEXTS = (
    "def f(x):\n    return x + 1\n",
    "Hello,  world!\tTabs\r\nand ünïcödé 日本語",
    " leading space",
    "",
)


@dataclass
class Source:
    """One checkpoint to export: a run directory and a step."""

    run: RunNode
    step: int

    @property
    def tag(self) -> str:
        return tag_for(self.step)

    @property
    def checkpoint_root(self) -> Path:
        return checkpoint_dir(self.run.path)

    @property
    def tag_dir(self) -> Path:
        return self.checkpoint_root / self.tag

    def describe(self) -> str:
        return f"{self.run.path}@{self.step}"


def resolve_source(run_dir: str | Path, step: int | None = None) -> Source:
    """The checkpoint of ``run_dir`` at ``step`` (default: ``latest``), or a clear error."""
    run = load_run(run_dir, recursive=False)
    steps = run.checkpoints
    if not steps:
        raise CheckpointError(
            f"RUN = {str(run.path)!r}: no complete checkpoint in {str(run.path / CHECKPOINTS)!r}; "
            "train until the first checkpoint interval (checkpoint.interval) or until the end"
        )
    if step is None:
        latest = run.latest_checkpoint
        tag_steps = {tag_for(s): s for s in steps}
        step = tag_steps.get(latest or "", steps[-1])
        if latest and latest not in tag_steps:
            log.warning(
                "%s: checkpoints/latest = %r is not a complete checkpoint; using step %d",
                run.path,
                latest,
                step,
            )
    elif step not in steps:
        hint = ""
        if run.branch_step is not None and step <= run.branch_step:
            hint = f"; step {step} is at or before this branch's start: export its parent run"
        raise CheckpointError(
            f"--step = {step}: no checkpoint saved at that step in {str(run.path)!r}; "
            f"available steps: {', '.join(map(str, steps))}{hint}"
        )
    return Source(run, step)


def resolve_member(spec: str, base: Path) -> tuple[Path, int | None]:
    """``PATH[@STEP]`` of an --average member: a path, or a branch name under ``base``."""
    path_text, _, step_text = (
        spec.strip().rpartition("@") if "@" in spec else (spec.strip(), "", "")
    )
    step = None
    if step_text:
        try:
            step = int(step_text)
        except ValueError:
            raise field_error(
                "--average", spec, "write members as PATH or PATH@STEP, STEP an integer"
            ) from None
    if not path_text:
        raise field_error(
            "--average", spec, "empty member; give comma-separated run paths or branch names"
        )
    # a branch name first (a bare name only: "." and ".." are RUN and its parent, never
    # RUN/branches itself), then a path relative to RUN, then a path as given
    bare_name = path_text not in (".", "..") and Path(path_text).name == path_text
    candidates = [base / "branches" / path_text] if bare_name else []
    candidates += [base / path_text, Path(path_text)]
    for c in candidates:
        if c.is_dir():
            return c, step
    raise field_error(
        "--average",
        spec,
        f"no such run; give a run directory or a branch name under {str(base / 'branches')!r}"
        + _branch_hint(base),
    )


def _branch_hint(base: Path) -> str:
    b = base / "branches"
    names = sorted(p.name for p in b.iterdir() if p.is_dir()) if b.is_dir() else []
    return f" (branches: {', '.join(names)})" if names else ""


# -- architecture ---------------------------------------------------------------------------


def find_model_config(source: Source, override: str | Path | None = None):
    """The transformers config of the run (see the module docstring for the search order)."""
    if override is not None:
        path = Path(override)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise field_error(
                "--model-config", str(override), "file not found; give a transformers config.json"
            )
        return load_model_config(path)
    searched = []
    for directory in (source.tag_dir, source.run.path, *_ancestor_runs(source.run.path)):
        for name in MODEL_CONFIG_NAMES:
            path = directory / name
            searched.append(str(path))
            if path.is_file():
                return load_model_config(path)
    # config.yaml naming a config.json: the same file + the data's vocabulary, as train does
    model = (source.run.config or {}).get("model")
    cfg_path = (
        model.get("config")
        if isinstance(model, dict)
        else (model if isinstance(model, str) and model.endswith(".json") else None)
    )
    if cfg_path and Path(cfg_path).is_file():
        config = load_model_config(Path(cfg_path))
        for key, value in (model.get("overrides") or {} if isinstance(model, dict) else {}).items():
            setattr(config, key, value)
        meta = _data_meta(source.run)
        if meta is None:
            raise CheckpointError(
                f"RUN = {str(source.run.path)!r}: model.config {cfg_path!r} needs the data's "
                "vocabulary (meta.json of data.path), which is not readable; pass --model-config"
            )
        config.vocab_size = int(meta["vocab_size"])  # as megawsd.train.model does
        for key in ("bos_id", "eos_id"):
            if isinstance(meta.get(key), int) and meta[key] >= 0:
                setattr(config, key.replace("_id", "_token_id"), meta[key])
        return config
    raise CheckpointError(
        f"RUN = {str(source.run.path)!r}: the model architecture is not recorded (looked for "
        f"{', '.join(searched[:3])}, ...); pass --model-config path/to/config.json "
        "(the transformers config the run was trained with)"
    )


def _ancestor_runs(run_dir: Path) -> list[Path]:
    """Parent runs by run.json's ``parent`` links (a branch shares its parent's model)."""
    out: list[Path] = []
    current = run_dir
    for _ in range(32):
        try:
            parent = json.loads((current / "run.json").read_text()).get("parent")
        except (OSError, ValueError, AttributeError):
            break
        if not isinstance(parent, str):
            break
        current = (current / parent).resolve()
        if current in out or not current.is_dir():
            break
        out.append(current)
    return out


def load_model_config(path: Path):
    """The transformers config in ``path`` (a config.json or a model_config.json), or a
    CheckpointError naming the file: a run's architecture comes from what it recorded."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path.parent if path.name == "config.json" else path))
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"model config = {str(path)!r}: not a transformers config ({err})"
        ) from None


def _arch_dict(config) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}


# -- weights --------------------------------------------------------------------------------


def is_schedule_free(run: RunNode) -> bool:
    opt = (run.optimizer or "").lower().replace("-", "_")
    return "schedule_free" in opt or "schedulefree" in opt or opt.startswith("sf_")


def load_weights(source: Source, weights: str = "x"):
    """Full fp32 weights of a checkpoint, by the parameter names the engine trained."""
    from megawsd.deepspeed import consolidate_checkpoint

    log.info("consolidating %s (%s weights)", source.tag_dir, weights)
    try:
        return consolidate_checkpoint(str(source.checkpoint_root), tag=source.tag, weights=weights)
    except CheckpointError:
        raise
    except (
        OSError,
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        KeyError,
        RuntimeError,
        IndexError,
    ) as err:
        raise CheckpointError(
            f"checkpoint = {str(source.tag_dir)!r}: cannot be read as a DeepSpeed checkpoint "
            f"({type(err).__name__}: {err}); it may be incomplete or damaged, export another --step"
        ) from None


def strip_prefix(state: dict, model_keys: set[str]) -> dict:
    """Map checkpoint names onto the model's (a wrapper module adds a prefix like ``module.``)."""
    if set(state) <= model_keys:
        return state
    first = next(iter(state), "")
    for i, ch in enumerate(first):
        if ch != ".":
            continue
        prefix = first[: i + 1]
        if all(k.startswith(prefix) for k in state):
            stripped = {k[len(prefix) :]: v for k, v in state.items()}
            if set(stripped) <= model_keys:
                return stripped
    return state


def build_model(config, state: dict, dtype: str = "float32"):
    """A transformers model of ``config`` holding ``state``; refuses anything but an exact fit."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    model_sd = model.state_dict()
    state = strip_prefix(state, set(model_sd))
    unexpected = sorted(set(state) - set(model_sd))
    bad_shape = sorted(
        k for k in set(state) & set(model_sd) if tuple(state[k].shape) != tuple(model_sd[k].shape)
    )
    # names absent from the checkpoint must be tied to a loaded tensor (lm_head <-> embeddings)
    ptr = {t.data_ptr(): k for k, t in model_sd.items() if k in state}
    missing = sorted(k for k in set(model_sd) - set(state) if model_sd[k].data_ptr() not in ptr)
    if unexpected or bad_shape or missing:
        detail = []
        if missing:
            detail.append(f"missing {missing[:4]}")
        if unexpected:
            detail.append(f"unexpected {unexpected[:4]}")
        if bad_shape:
            k = bad_shape[0]
            detail.append(
                f"shape of {k}: checkpoint {tuple(state[k].shape)} vs config {tuple(model_sd[k].shape)}"
            )
        raise CheckpointError(
            f"checkpoint and model config disagree ({'; '.join(detail)}); pass the config the "
            "run was trained with (--model-config)"
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        dtype
    ]
    model.to(torch_dtype)
    model.config.use_cache = True  # trained with use_cache=False; generation wants the cache
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True
    model.eval()
    return model


def average_states(states: Iterable[dict]) -> dict:
    """Uniform average (a model soup) of state dicts, checked to have the same names/shapes.

    Members are consumed one at a time into an fp32 running sum, so a soup of N members
    holds two models in memory, not N.
    """
    total: dict | None = None
    n = 0
    for i, sd in enumerate(states):
        n += 1
        if total is None:
            total = {k: v.detach().float().clone() for k, v in sd.items()}
            continue
        if set(sd) != set(total):
            diff = sorted(set(total) ^ set(sd))
            raise CheckpointError(
                f"--average: member {i} has other parameters than member 0 ({diff[:4]})"
            )
        for k, v in sd.items():
            if v.shape != total[k].shape:
                raise CheckpointError(
                    f"--average: parameter {k!r} has shape {tuple(v.shape)} in member {i}, "
                    f"{tuple(total[k].shape)} in member 0"
                )
            total[k] += v.float()
    if total is None:
        raise CheckpointError("--average: no members to average")
    return {k: v / n for k, v in total.items()}


# -- tokenizer ------------------------------------------------------------------------------


def _data_dirs(run: RunNode) -> list[Path]:
    """Prepared data directories named by the run's config.yaml (data.path: dir, mix, list).

    A relative path was relative to the directory training was started from, which export
    does not know: it is tried as given, then against the run directory and its ancestors.
    """
    data = (run.config or {}).get("data")
    if isinstance(data, dict):
        data = data.get("path")
    items: list[Any] = data if isinstance(data, list) else [data] if isinstance(data, str) else []
    names = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("path")
        if not isinstance(item, str):
            continue
        for part in item.split(","):
            p = part.strip()
            if ":" in p and not Path(p).exists():
                p = p.rsplit(":", 1)[0]  # "dir:0.7" in a weighted mix
            names.append(Path(p))
    out = []
    for p in names:
        bases = (
            [Path.cwd()] if p.is_absolute() else [Path.cwd(), run.path, *run.path.resolve().parents]
        )
        for base in bases:
            if (base / p / "meta.json").is_file():
                out.append(base / p)
                break
    return out


def _data_meta(run: RunNode) -> dict | None:
    for d in _data_dirs(run):
        try:
            return json.loads((d / "meta.json").read_text()) | {"_dir": str(d)}
        except (OSError, json.JSONDecodeError):
            continue
    return None


def find_tokenizer(run: RunNode, source_dir: Path | None = None) -> Path | None:
    """The sentencepiece model the run's data was tokenized with, if it can be found."""
    for d in [p for p in (source_dir, run.path) if p is not None]:
        if (d / "tokenizer.model").is_file():
            return d / "tokenizer.model"
    for d in _data_dirs(run):
        name = "tokenizer.model"
        try:
            name = json.loads((d / "meta.json").read_text()).get("tokenizer") or name
        except (OSError, json.JSONDecodeError):
            pass
        if (d / name).is_file():
            return d / name
    return None


def build_hf_tokenizer(
    sp_model: Path, out_dir: Path, max_length: int | None = None
) -> tuple[bool, str]:
    """Wrap the sentencepiece model as a transformers tokenizer saved into ``out_dir``.

    transformers 5 builds a ``tokenizers`` pipeline straight from the .model proto
    (``TokenizersBackend``), which reproduces sentencepiece's normaliser, pieces and byte
    fallback for both BPE and unigram models; the result is checked against sentencepiece on
    sample texts and only written when ids and decoded text agree. Returns (written, note).
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False, "this transformers version cannot convert sentencepiece models (needs >= 5)"
    special = {}
    for key, idx in (
        ("bos_token", sp.bos_id()),
        ("eos_token", sp.eos_id()),
        ("unk_token", sp.unk_id()),
        ("pad_token", sp.pad_id()),
    ):
        if idx >= 0:
            special[key] = sp.id_to_piece(idx)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(sp_model, Path(tmp) / "tokenizer.model")
        try:
            extra = {"model_max_length": max_length} if max_length else {}
            tok = TokenizersBackend.from_pretrained(tmp, **special, **extra)
        except Exception as err:  # conversion failures come in many types; report, not crash
            return False, f"conversion failed ({type(err).__name__}: {err})"
    bad = [
        t
        for t in _SAMPLE_TEXTS
        if tok.encode(t, add_special_tokens=False) != sp.encode(t)
        or tok.decode(sp.encode(t)) != sp.decode(sp.encode(t))
    ]
    if bad:
        return False, f"converted tokenizer disagrees with sentencepiece on {bad[0]!r}"
    tok.save_pretrained(str(out_dir))
    return True, "tokenizer.json (TokenizersBackend) verified against sentencepiece"


# -- the export -----------------------------------------------------------------------------


@dataclass
class ExportResult:
    out: Path
    members: list[str]
    weights: str
    tokenizer: str  # "hf" (AutoTokenizer works), "sentencepiece" (.model only) or "none"
    notes: list[str]


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def check_out_dir(out: Path, force: bool, protected: list[Path]) -> None:
    for run_dir in protected:
        if _is_within(out, run_dir):
            raise field_error(
                "--out",
                str(out),
                f"is inside the run directory {str(run_dir)!r}, which "
                "export never writes to; choose a directory outside it",
            )
    if out.exists() and not out.is_dir():
        raise field_error("--out", str(out), "exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise field_error(
            "--out",
            str(out),
            "is not empty; choose an empty or new directory, or "
            "pass --force to replace its contents",
        )


def export(
    run: str | Path,
    out: str | Path,
    *,
    step: int | None = None,
    weights: str = "x",
    average: list[str] | None = None,
    force: bool = False,
    dtype: str = "float32",
    model_config: str | Path | None = None,
) -> ExportResult:
    """Export ``run`` (or the soup of ``average`` members) to a transformers directory."""
    if weights not in ("x", "y"):
        raise field_error("--weights", weights, 'use "x" (schedule-free evaluation weights) or "y"')
    if dtype not in ("float32", "bfloat16", "float16"):
        raise field_error("--dtype", dtype, "use float32, bfloat16 or float16")
    base, out = Path(run), Path(out)
    sources = _sources(base, step, average)
    check_out_dir(out, force, [s.run.path for s in sources] + [base])
    config = _common_config(sources, model_config)
    notes = [
        f"{s.describe()}: schedule-free run exported at y (the gradient point), not x"
        for s in sources
        if weights == "y" and is_schedule_free(s.run)
    ]

    if len(sources) == 1:
        state = load_weights(sources[0], weights)
    else:
        state = average_states(load_weights(s, weights) for s in sources)
    model = build_model(config, state, dtype)
    tok_kind = _write_model_dir(model, config, sources, out, weights, dtype, notes)
    # x and y coincide for any optimizer but schedule-free: say what was really written.
    label = weights if any(is_schedule_free(s.run) for s in sources) else "trained"
    return ExportResult(out, [s.describe() for s in sources], label, tok_kind, notes)


def _sources(base: Path, step: int | None, average: list[str] | None) -> list[Source]:
    """The checkpoints to export: ``base`` at ``step``, or every --average member (a member
    without its own @STEP takes ``step``). Resolved before anything is read or written, so a
    wrong name fails in a second, not after consolidating the others."""
    if not base.exists():
        raise CheckpointError(
            f"RUN = {str(base)!r}: no such directory; pass a run or branch directory"
        )
    if not average:
        return [resolve_source(base, step)]
    specs = [resolve_member(s, base) for s in average]
    if step is not None:
        specs = [(p, s if s is not None else step) for p, s in specs]
    return [resolve_source(p, s) for p, s in specs]


def _common_config(sources: list[Source], model_config: str | Path | None):
    """The members' one architecture: a soup of different models is not a model, so members
    whose configs differ (beyond _VOLATILE_CONFIG_KEYS) are refused."""
    configs = [find_model_config(s, model_config) for s in sources]
    ref = _arch_dict(configs[0])
    for s, c in zip(sources[1:], configs[1:]):
        d = _arch_dict(c)
        if d != ref:
            diff = sorted(k for k in set(d) | set(ref) if d.get(k) != ref.get(k))
            raise CheckpointError(
                f"--average: {s.describe()} has another architecture than {sources[0].describe()} "
                f"(differs in {', '.join(diff[:6])}); only runs of one model can be averaged"
            )
    return configs[0]


def _write_model_dir(
    model, config, sources: list[Source], out: Path, weights: str, dtype: str, notes: list[str]
) -> str:
    """Write the model, its tokenizer and megawsd_export.json into a temporary sibling of
    ``out`` and rename it into place: a failed export leaves no half-written model. Returns
    the tokenizer kind ("hf", "sentencepiece" or "none"); appends to ``notes``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the model dir is a normal dir
    try:
        model.save_pretrained(str(tmp))
        for f in tmp.iterdir():  # some writers create 0600 temp files; a model dir is shared
            os.chmod(f, 0o666 & ~umask)
        tok_kind = _ship_tokenizer(sources[0], config, tmp, notes)
        meta = {
            "megawsd_version": __version__,
            "weights": weights,
            "dtype": dtype,
            "members": [_member_info(s) for s in sources],
            "averaged": len(sources) > 1,
            "tokenizer": tok_kind,
            "notes": notes,
        }
        (tmp / "megawsd_export.json").write_text(json.dumps(meta, indent=2) + "\n")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tok_kind


def _ship_tokenizer(source: Source, config, tmp: Path, notes: list[str]) -> str:
    """Copy the run's sentencepiece model into the export and, when the conversion is verified
    against sentencepiece, an AutoTokenizer for it. Returns "hf", "sentencepiece" or "none";
    what a user will miss goes into ``notes``."""
    sp_model = find_tokenizer(source.run, source.tag_dir)
    if sp_model is None:
        notes.append(
            "no sentencepiece tokenizer found (run dir, checkpoint or the data dir in "
            "config.yaml); the model directory has no tokenizer"
        )
        return "none"
    shutil.copyfile(sp_model, tmp / "tokenizer.model")
    ok, note = build_hf_tokenizer(sp_model, tmp, getattr(config, "max_position_embeddings", None))
    if not ok:
        notes.append(f"tokenizer.model shipped; AutoTokenizer will not load it: {note}")
    return "hf" if ok else "sentencepiece"


def _member_info(s: Source) -> dict[str, Any]:
    val = None
    for rec in s.run.metrics.eval:
        if rec.get("step") == s.step and isinstance(rec.get("val_loss"), (int, float)):
            val = rec["val_loss"] if math.isfinite(rec["val_loss"]) else None
    return {
        "run": str(s.run.path.resolve()),
        "name": s.run.name,
        "step": s.step,
        "tokens": s.step * s.run.tokens_per_step if s.run.tokens_per_step else None,
        "optimizer": s.run.optimizer,
        "schedule": s.run.schedule,
        "val_loss_at_step": val,
    }


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp``; an existing (forced) ``out`` is removed only after."""
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
