"""Batch-1 decode: oneDNN's matrix product against torch.mv for the one-row linear layers.

    python -m fms_speech.bench.experiments.decode_gemv [--llm-layers 10] [--new-tokens 8]
        [--rounds 5]

At batch 1 every LLM linear of a decode step multiplies one row by a weight matrix. In bf16 on
this CPU, `F.linear` (oneDNN) streams the weights at about 19–20 GB/s, `torch.mv` (ATen's own
bf16 gemv) at about 27 GB/s (see docs/bench-notes.md). `ROWS_TIMES_MATRIX` is an inductor
post-grad pass that routes every bf16 matrix product through an op that calls `torch.mv` when
the product has one row (the decode graph's batch size is symbolic, so it is decided at run
time) and `torch.mm` otherwise. This experiment compiles the 3.3-2b LLM (random weights, fewer
layers) with and without the pass, times generate() at batch 1 in turns, and checks that the
tokens agree. Not adopted (see docs/bench-notes.md): kept to re-measure on other machines.
"""

import argparse
import hashlib
import inspect

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from fms_speech.bench import roofline
from fms_speech.bench.experiments.random_weights import audio_prompts, variant_model
from fms_speech.bench.measure import profile_call, summary
from fms_speech.compile import compile_model, cpu_bf16_products
from fms_speech.generation import generate

aten = torch.ops.aten
CPU = torch.device("cpu")


# A plain library op (no torch.library.custom_op wrapper: that adds about 80 us a call, 30 ms
# a decode step at 40 layers). Opaque to inductor, which would turn aten.mv back into mm.
_LIBRARY = torch.library.Library("fms_speech_bench", "DEF")
_LIBRARY.define("rows_times_matrix(Tensor rows, Tensor matrix) -> Tensor")


def rows_times_matrix(rows: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """rows @ matrix, by torch.mv when there is one row (decided when it runs: the decode
    graph's batch size is symbolic)."""
    if rows.shape[0] == 1:
        return torch.mv(matrix.t(), rows[0]).unsqueeze(0)
    return torch.mm(rows, matrix)


def _rows_times_matrix_shape(rows, matrix):
    return rows.new_empty(rows.shape[0], matrix.shape[1])


_LIBRARY.impl("rows_times_matrix", rows_times_matrix, "CPU")
_LIBRARY.impl("rows_times_matrix", _rows_times_matrix_shape, "Meta")
torch.library.register_fake("fms_speech_bench::rows_times_matrix", _rows_times_matrix_shape)
MIN_WEIGHTS = 1 << 20  # smaller products (the LoRA's) stay inductor's


class RowsTimesMatrix(CustomGraphPass):
    """Every bf16 mm / addmm with at least MIN_WEIGHTS weights -> rows_times_matrix (+ bias)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node, rows, matrix, bias in cpu_bf16_products(graph):  # the op has a CPU kernel only
            weights = matrix.meta.get("val")
            if weights is None or weights.numel() < MIN_WEIGHTS:
                continue
            with graph.inserting_before(node):
                out = graph.call_function(rows_times_matrix_op, (rows, matrix))
                if bias is not None:
                    out = graph.call_function(aten.add.Tensor, (out, bias))
            node.replace_all_uses_with(out)
            graph.erase_node(node)

    def uuid(self) -> bytes:
        return hashlib.sha256(inspect.getsource(type(self)).encode()).digest()


ROWS_TIMES_MATRIX = RowsTimesMatrix()
rows_times_matrix_op = torch.ops.fms_speech_bench.rows_times_matrix.default


def decode_seconds(runner, prompt, features, lengths, new_tokens: int) -> tuple[float, list]:
    output = generate(
        runner, [prompt], features, lengths, max_new_tokens=new_tokens, eos_token_id=-1
    )
    return output.decode_seconds / output.decode_steps, output.sequences[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-layers", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--profile", action="store_true", help="top ops of one decode run")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    model = variant_model("3.3-2b", 1, args.llm_layers, dtype=torch.bfloat16)
    (prompt,), features, lengths = audio_prompts(model, 1, args.seconds)
    text = model.config.text_config
    weights = roofline.decode_weight_count(model.language_model, text.tie_heads) * 2
    bandwidth = roofline.memory_bandwidth(CPU)
    print(f"{args.llm_layers} LLM layers: {weights / 1e9:.2f} GB of bf16 weights per step; ")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s -> {weights / bandwidth * 1e3:.0f} ms")
    runners = {
        "eager": model,
        "compiled": compile_model(model),
        "compiled + mv pass": compile_model(
            model, options={"post_grad_custom_post_pass": ROWS_TIMES_MATRIX}
        ),
    }
    tokens = {}
    for name, runner in runners.items():  # first calls: compile
        _, tokens[name] = decode_seconds(runner, prompt, features, lengths, args.new_tokens)
    print("same tokens:", len({tuple(t) for t in tokens.values()}) == 1)
    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            step, _ = decode_seconds(runner, prompt, features, lengths, args.new_tokens)
            times[name].append(step)
    if args.profile:
        runner = runners["compiled + mv pass"]
        profile = profile_call(
            lambda: decode_seconds(runner, prompt, features, lengths, args.new_tokens), CPU, 20
        )
        print(profile["table"])
    for name, values in times.items():
        stats = summary(values)
        print(
            f"{name}: {stats['median'] * 1e3:.0f} ms per decode step "
            f"[{stats['min'] * 1e3:.0f}–{stats['max'] * 1e3:.0f}] = "
            f"{stats['median'] / (weights / bandwidth):.2f}x the weights-read time"
        )


if __name__ == "__main__":
    main()
