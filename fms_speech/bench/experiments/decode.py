"""Prefill and per-token decode time, eager against compiled; compile time and graph counts.

    python -m fms_speech.bench.experiments.decode [--models tiny 2b] [--dtypes fp32 bf16]
        [--new-tokens 32] [--threads 1]

Random weights: "tiny" is the test checkpoints' size (`fms_speech.testing.reference`: vocab 256,
32-wide LLM), "2b" the 3.3-2b widths with 2 encoder and 2 LLM layers. Clips of 10 s (500
frames), ragged batches; the eos never comes, so every call decodes new_tokens - 1 steps. The
compiled model meets batch 1 first, then batch 4, then beams (batch 2 x 4 beams); the compile
columns are the first call's time over the steady one. Graphs are counted per phase: prefill
(with audio) and decode (without).
"""

import argparse
import statistics
from collections import Counter

import torch

from fms_speech.bench.experiments.random_weights import audio_prompts, tiny_model, variant_model
from fms_speech.compile import compile_model
from fms_speech.generation import GenerationOutput, generate

SECONDS = 10
NEVER = -1  # an eos id no model writes
REPEATS = 5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODELS = {
    "tiny": tiny_model,
    "2b": lambda dtype: variant_model("3.3-2b", encoder_layers=2, llm_layers=2, dtype=dtype),
}
# (label, batch, beams); the compiled model sees them in this order
CALLS = [("batch 1", 1, 1), ("batch 4", 4, 1), ("batch 2 x 4 beams", 2, 4)]


def run_generate(model, inputs, num_beams: int, new_tokens: int) -> GenerationOutput:
    return generate(
        model, *inputs, max_new_tokens=new_tokens, eos_token_id=NEVER, num_beams=num_beams
    )


def counting_backend(graphs: Counter):
    """inductor, counting the graphs it compiles: prefill (audio in the inputs) or decode."""
    inductor = torch._dynamo.lookup_backend("inductor")

    def backend(graph_module, example_inputs):
        compiled = inductor(graph_module, example_inputs)
        placeholders = graph_module.graph.find_nodes(op="placeholder")
        audio = any("input_features" in node.name for node in placeholders)
        graphs["prefill" if audio else "decode"] += 1
        return compiled

    return backend


def median_output(outputs: list[GenerationOutput]) -> GenerationOutput:
    """Median prefill and decode times of repeated calls."""
    return GenerationOutput(
        outputs[0].sequences,
        statistics.median(o.prefill_seconds for o in outputs),
        statistics.median(o.decode_seconds for o in outputs),
        outputs[0].decode_steps,
    )


def per_token_ms(output: GenerationOutput) -> float:
    return 1000 * output.decode_seconds / max(output.decode_steps, 1)


def measure(name: str, dtype_name: str, new_tokens: int) -> None:
    model = MODELS[name](DTYPES[dtype_name])
    torch._dynamo.reset()
    graphs = Counter()
    compiled = compile_model(model, backend=counting_backend(graphs))
    print(f"\n{name} {dtype_name}, {SECONDS} s clips, {new_tokens} new tokens", flush=True)
    print(
        f"{'call':<18} {'eager prefill':>13} {'eager ms/tok':>12} {'compiled prefill':>16} "
        f"{'compiled ms/tok':>15} {'compile prefill':>15} {'compile decode':>14}  graphs so far"
    )
    for label, batch, beams in CALLS:
        inputs = audio_prompts(model, batch, SECONDS, ragged=True, seed=batch)
        run_generate(model, inputs, beams, new_tokens)  # warm-up
        first = run_generate(compiled, inputs, beams, new_tokens)
        # alternated and repeated: the machine is shared and noisy, medians are reported
        eager_runs, compiled_runs = [], []
        for _ in range(REPEATS):
            eager_runs.append(run_generate(model, inputs, beams, new_tokens))
            compiled_runs.append(run_generate(compiled, inputs, beams, new_tokens))
        eager, steady = median_output(eager_runs), median_output(compiled_runs)
        # the first call's extra time over the steady one: compilation (0 once graphs exist)
        compile_prefill = first.prefill_seconds - steady.prefill_seconds
        compile_decode = first.decode_seconds - steady.decode_seconds
        print(
            f"{label:<18} {eager.prefill_seconds:>12.3f}s {per_token_ms(eager):>12.2f} "
            f"{steady.prefill_seconds:>15.3f}s {per_token_ms(steady):>15.2f} "
            f"{compile_prefill:>14.1f}s {compile_decode:>13.1f}s  "
            f"prefill {graphs['prefill']}, decode {graphs['decode']}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--new-tokens", type=int, default=32)
    # one thread by default: on a shared machine, busy cores make multi-threaded runs erratic
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    for name in args.models:
        for dtype_name in args.dtypes:
            measure(name, dtype_name, args.new_tokens)


if __name__ == "__main__":
    main()
