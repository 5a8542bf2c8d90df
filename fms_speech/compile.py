"""One compiled graph per call type (prefill, decode step) for every audio length and batch size.

`compile_model` compiles with dynamic shapes from the first call. These details make a single
dynamic graph hold for every shape:
- `backed_size_oblivious`: view/reshape rules otherwise branch on whether a symbolic size
  equals 1 (one block, one window) and each branch is a new graph;
- no duck sizing: FMS's rotary cos/sin table is a graph input with sizes like 2 and head_dim/2,
  and duck sizing would give a batch of the same size the same symbol, pin it, and recompile
  for every other batch size;
- with `backed_size_oblivious` a first batch of 1 gets a symbol like any other size, and the
  model never asks whether it is 1 (fms_speech.models.layout): a first call with one clip
  compiles the graph every later batch size reuses (docs/compile-efficiency.md).

`fms_speech.aot` exports the same two call types ahead of time instead.
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
