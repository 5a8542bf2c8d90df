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
  call type serves batch 1 too (docs/compile-efficiency.md); torch 2.11 cannot bound an unbacked
  size below, so there the batch stays backed (`UNBACKED_BATCH_WORKS`: a first batch of 1 is one
  more graph per call type);
- no inductor runtime assertions: with an unbacked input size, torch 2.13's inductor emits
  assertions (the batch >= 1, every input's batch equal) that name symbols its generated code
  never binds (NameError at the first call; the class of pytorch/pytorch#154146). The model's
  pre-hook checks the same eagerly (every input's batch equal; a batch is at least 1).

`fms_speech.aot` exports the same two call types ahead of time instead (one package each, batch
1 included).
"""

import hashlib
import inspect
from collections.abc import Iterator

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from fms_speech._compat import (
    UNBACKED_BATCH_WORKS,
    cpu_has_bf16_matmul,
    fx_config,
    inductor_config,
)

aten = torch.ops.aten

# see the module docstring; also what fms_speech.aot exports under
SYMBOLIC_SHAPE_SETTINGS = {"backed_size_oblivious": True, "use_duck_shape": False}
INDUCTOR_SETTINGS = {"do_not_emit_runtime_assertions": True}


def compile_model(model: torch.nn.Module, **compile_kwargs) -> torch.nn.Module:
    """torch.compile(model) with dynamic shapes and no graph breaks allowed.

    A GraniteSpeech's batch becomes unbacked from here on (`model.unbacked_batch = True`: its
    forward pre-hook marks it; eager calls are unchanged). On a CPU without bf16 instructions,
    bf16 matrix products of 32 rows or more run in float32 (`Bf16ProductsInFloat32`, below).
    """
    # process-wide: it only changes how symbolic sizes are reasoned about, not results
    for name, value in SYMBOLIC_SHAPE_SETTINGS.items():
        setattr(fx_config, name, value)
    if hasattr(model, "unbacked_batch") and UNBACKED_BATCH_WORKS:
        model.unbacked_batch = True
        for name, value in INDUCTOR_SETTINGS.items():
            setattr(inductor_config, name, value)
    compile_kwargs.setdefault("fullgraph", True)
    compile_kwargs.setdefault("dynamic", True)
    inductor = compile_kwargs.get("backend", "inductor") == "inductor"
    if inductor and "mode" not in compile_kwargs:  # torch.compile takes mode or options
        compile_kwargs["options"] = {**cpu_inductor_settings(), **compile_kwargs.get("options", {})}
    return torch.compile(model, **compile_kwargs)


# bf16 matrix products on a CPU without bf16 instructions. There ATen's bf16 GEMM is 6-30x
# slower than casting to float32, multiplying and rounding back (the encoder's 30 s products on
# this project's AVX2 CPU; docs/compile-efficiency.md), and the result is the same: a bf16 GEMM
# accumulates in float32 and rounds once. With one row (a decode step at batch 1) ATen's bf16
# matrix-vector kernel is the faster, and casting the weights costs more than the product up to
# about 32 rows, so the choice is made when the product runs: the row count is symbolic.
FLOAT32_MIN_ROWS = 32

_LIBRARY = torch.library.Library("fms_speech", "DEF")
_LIBRARY.define("bf16_mm(Tensor rows, Tensor matrix, Tensor? bias) -> Tensor")


def bf16_mm(rows: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """rows @ matrix (+ bias) in the inputs' dtype, in float32 from FLOAT32_MIN_ROWS rows."""
    if rows.shape[0] < FLOAT32_MIN_ROWS:
        return torch.mm(rows, matrix) if bias is None else torch.addmm(bias, rows, matrix)
    dtype, rows, matrix = rows.dtype, rows.float(), matrix.float()
    product = torch.mm(rows, matrix) if bias is None else torch.addmm(bias.float(), rows, matrix)
    return product.to(dtype)


def _bf16_mm_shape(rows, matrix, bias):
    return rows.new_empty(rows.shape[0], matrix.shape[1])


# a plain library op, not torch.library.custom_op, whose wrapper costs about 80 us a call
_LIBRARY.impl("bf16_mm", bf16_mm, "CPU")
torch.library.register_fake("fms_speech::bf16_mm", _bf16_mm_shape)


def cpu_bf16_products(graph: torch.fx.Graph) -> Iterator[tuple[torch.fx.Node, ...]]:
    """(node, rows, matrix, bias or None) for each aten.mm and plain aten.addmm (no beta or
    alpha) of bf16 CPU tensors in an inductor post-grad graph.

    A generator that reads each node's arguments when it reaches the node: a caller may replace
    the products it was given before asking for the next (whose rows may be one of them).
    """
    for node in list(graph.nodes):
        if node.op != "call_function" or node.kwargs:
            continue
        if node.target is aten.mm.default:
            (rows, matrix), bias = node.args, None
        elif node.target is aten.addmm.default and len(node.args) == 3:
            bias, rows, matrix = node.args
        else:
            continue
        value = rows.meta.get("val")
        if value is not None and value.dtype == torch.bfloat16 and value.device.type == "cpu":
            yield node, rows, matrix, bias


class Bf16ProductsInFloat32(CustomGraphPass):
    """Inductor post-grad pass: every CPU bf16 aten.mm / aten.addmm -> fms_speech::bf16_mm."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node, rows, matrix, bias in cpu_bf16_products(graph):
            with graph.inserting_before(node):
                product = graph.call_function(bf16_mm_op, (rows, matrix, bias))
            product.meta.update(node.meta)
            node.replace_all_uses_with(product)
            graph.erase_node(node)

    def uuid(self) -> bytes:
        source = "".join(map(inspect.getsource, (type(self), bf16_mm, cpu_bf16_products)))
        return hashlib.sha256(f"{source}{FLOAT32_MIN_ROWS}".encode()).digest()


bf16_mm_op = torch.ops.fms_speech.bf16_mm.default
BF16_PRODUCTS_IN_FLOAT32 = Bf16ProductsInFloat32()


def cpu_inductor_settings() -> dict:
    """Inductor settings for this CPU: the pass above where bf16 products need it."""
    if cpu_has_bf16_matmul():
        return {}
    return {"post_grad_custom_post_pass": BF16_PRODUCTS_IN_FLOAT32}
