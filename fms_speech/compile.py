"""One dynamic graph per call type (prefill, decode step) for every audio length and batch size.

`compile_model` compiles with dynamic shapes from the first call. These details make a single
dynamic graph hold for every shape:
- `backed_size_oblivious`: view/reshape rules otherwise branch on whether a symbolic size
  equals 1 (one block, one window) and each branch is a new graph;
- no duck sizing: FMS's rotary cos/sin table is a graph input with sizes like 2 and head_dim/2,
  and duck sizing would give a batch of the same size the same symbol, pin it, and recompile
  for every other batch size;
- the batch of a GraniteSpeech is an unbacked size (`mark_unbacked` in its forward pre-hook,
  one symbol shared by every input): inductor's lowering of views (the encoder's blocks, FMS's
  attention and feed-forward, the head) and of cumsum otherwise asks whether a backed batch is
  1 and guards on the answer, so a first call with a single clip compiled a batch-1 graph and
  the next batch size the dynamic one; an unbacked size has no hint to ask, and one graph per
  call type serves batch 1 too (docs/compile-efficiency.md);
- no inductor runtime assertions: with an unbacked input size, torch 2.13's inductor emits
  assertions (the batch >= 1, every input's batch equal) that name symbols its generated code
  never binds (NameError at the first call; the class of pytorch/pytorch#154146). The model's
  pre-hook checks the same eagerly (every input's batch equal; a batch is at least 1).

`fms_speech.aot` exports the same two call types ahead of time instead (one package each, batch
1 included).
"""

import torch

from fms_speech._compat import fx_config, inductor_config

# see the module docstring; also what fms_speech.aot exports under
SYMBOLIC_SHAPE_SETTINGS = {"backed_size_oblivious": True, "use_duck_shape": False}
INDUCTOR_SETTINGS = {"do_not_emit_runtime_assertions": True}


def compile_model(model: torch.nn.Module, **compile_kwargs) -> torch.nn.Module:
    """torch.compile(model) with dynamic shapes and no graph breaks allowed.

    A GraniteSpeech's batch becomes unbacked from here on (`model.unbacked_batch = True`: its
    forward pre-hook marks it; eager calls are unchanged).
    """
    # process-wide: it only changes how symbolic sizes are reasoned about, not results
    for name, value in SYMBOLIC_SHAPE_SETTINGS.items():
        setattr(fx_config, name, value)
    if hasattr(model, "unbacked_batch"):
        model.unbacked_batch = True
        for name, value in INDUCTOR_SETTINGS.items():
            setattr(inductor_config, name, value)
    compile_kwargs.setdefault("fullgraph", True)
    compile_kwargs.setdefault("dynamic", True)
    return torch.compile(model, **compile_kwargs)
