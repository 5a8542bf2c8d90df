"""One compiled graph for every audio length and batch size.

`compile_model` compiles with dynamic shapes from the first call. Three details make a single
dynamic graph hold for every shape:
- `backed_size_oblivious`: view/reshape rules otherwise branch on whether a symbolic size
  equals 1 (one block, one window) and each branch is a new graph;
- no duck sizing: FMS's rotary cos/sin table is a graph input with sizes like 2 and head_dim/2,
  and duck sizing would give a batch of the same size the same symbol, pin it, and recompile
  for every other batch size;
- dynamo still specialises an input dimension that *is* 1 on the first call, so a first call
  with a single clip yields a batch-1 graph and the next batch size one dynamic graph: at most
  two compilations in all (see docs/compile-efficiency.md).
"""

import torch

from fms_speech._compat import fx_config


def compile_model(model: torch.nn.Module, **compile_kwargs) -> torch.nn.Module:
    """torch.compile(model) with dynamic shapes and no graph breaks allowed."""
    # process-wide: it only changes how symbolic sizes are reasoned about, not results
    fx_config.backed_size_oblivious = True
    fx_config.use_duck_shape = False
    compile_kwargs.setdefault("fullgraph", True)
    compile_kwargs.setdefault("dynamic", True)
    return torch.compile(model, **compile_kwargs)
