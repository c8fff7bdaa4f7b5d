"""megawsd.data: sentencepiece tokenizer, corpus preparation and the step-indexed loader.

Public API (imported lazily, so `import megawsd.data` does not pull torch or datasets):

- ``prepare(inputs, out_dir, ...) -> Meta``: corpus -> DIR/{train,val}.bin + meta.json.
- ``load_meta(dir_or_meta_json) -> Meta``: read and validate a prepared directory.
- ``DataMix``: several prepared directories with weights (``DataMix.parse("a:0.7,b:0.3")``).
- ``TokenStream(data, seq_len, global_batch_size, seed)``: ``global_batch(step)``,
  ``micro_batch(step, m, mb, rank, world_size)``, ``val_batches(n, bs)``, ``epoch(step)``.
- ``SwitchedStream(before, after, at_step)``: a branch that changes data from its branch step.
- ``Stream``: the protocol both implement (what the training loop reads), with ``metas``
  (every prepared directory read) and ``parent_part`` (the stream a parent run read).
- ``stream_from_state(state_dict)``: rebuild a stream from a checkpoint's data state.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Meta": "megawsd.data.meta",
    "load_meta": "megawsd.data.meta",
    "token_dtype": "megawsd.data.meta",
    "DataMix": "megawsd.data.loader",
    "TokenStream": "megawsd.data.loader",
    "SwitchedStream": "megawsd.data.loader",
    "Stream": "megawsd.data.loader",
    "ValBatches": "megawsd.data.loader",
    "stream_from_state": "megawsd.data.loader",
    "prepare": "megawsd.data.preparation",
    "PrepareResult": "megawsd.data.preparation",
    "load_tokenizer": "megawsd.data.tokenizer",
    "resolve_inputs": "megawsd.data.sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'megawsd.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
