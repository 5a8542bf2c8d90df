"""One dynamic graph per call type (prefill, decode step) for every audio length and batch size.

`compile_model` compiles with dynamic shapes from the first call. These details make a single
dynamic graph hold for every shape:
- `backed_size_oblivious`: view/reshape rules otherwise branch on whether a symbolic size
  equals 1 (one block, one window) and each branch is a new graph;
- no duck sizing: FMS's rotary cos/sin table is a graph input with sizes like 2 and head_dim/2,
  and duck sizing would give a batch of the same size the same symbol, pin it, and recompile
  for every other batch size;
- a first call with a single clip still compiles a batch-1 graph per call type: inductor's
  lowering of views (the encoder's blocks, FMS's attention and feed-forward, the head) asks
  whether the symbolic batch is 1 and guards on the answer; the next batch size compiles the
  dynamic graph that every later one reuses: at most two compilations per call type
  (docs/compile-efficiency.md).

`fms_speech.aot` exports the same two call types ahead of time instead (one package each, batch
1 included).
"""

import torch

from fms_speech._compat import fx_config

# see the module docstring; also what fms_speech.aot exports under
SYMBOLIC_SHAPE_SETTINGS = {"backed_size_oblivious": True, "use_duck_shape": False}


def compile_model(model: torch.nn.Module, **compile_kwargs) -> torch.nn.Module:
    """torch.compile(model) with dynamic shapes and no graph breaks allowed."""
    # process-wide: it only changes how symbolic sizes are reasoned about, not results
    for name, value in SYMBOLIC_SHAPE_SETTINGS.items():
        setattr(fx_config, name, value)
    compile_kwargs.setdefault("fullgraph", True)
    compile_kwargs.setdefault("dynamic", True)
    return torch.compile(model, **compile_kwargs)
