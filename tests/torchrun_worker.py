"""What tests/test_distributed.py runs in each torchrun process.

    python tests/torchrun_worker.py RUN_DIR JOB ARGS...

Every worker first writes its pid to RUN_DIR/rank<R>.pid, so that the test can stop every
process it started (torchrun starts its workers in sessions of their own), and at the end its
exit code(s) to RUN_DIR/rank<R>.exit (torchrun turns any failure into exit code 1). Jobs:

- `cli ARGS... [--- ARGS...]`: `fms-speech` command lines, one after another in this process;
  each after the first forms its process group anew on the next port of FMS_SPEECH_TEST_PORTS
  (a group cannot form twice on torchrun's store: the old one's keys are still there);
- `tensor-parallel INPUTS`: the tensor-parallel model's logits (eager and compiled) and
  generations on the inputs the test saved (`make_inputs`), written to RUN_DIR/rank<R>.pt.

With FMS_SPEECH_TEST_LEAVING_RANK=N, rank N instead joins the process group and exits 0 at once:
a rank that leaves early, which torchrun does not treat as a failure.
"""

import json
import os
import sys
from pathlib import Path

import torch

LEAVING_RANK = "FMS_SPEECH_TEST_LEAVING_RANK"
PORTS = "FMS_SPEECH_TEST_PORTS"


# ---- the forward calls compared between one process and tensor parallelism


def make_inputs(model, seed: int = 0) -> list[dict]:
    """Forward calls covering the audio LoRA on, off and mixed per row, two batch sizes, a
    decode step on the prefill's cache and a text-only prompt. `model` (single-process) gives
    each clip's number of audio tokens."""
    from fms_speech.testing.reference import prompt_ids

    generator = torch.Generator().manual_seed(seed)

    def audio(batch: int, frames: int):
        features = torch.randn(batch, frames, 160, generator=generator)
        lengths = torch.randint(frames // 2, frames + 1, (batch,), generator=generator)
        lengths[0] = frames
        prompts = [prompt_ids(n) for n in model.audio_token_counts(features, lengths).tolist()]
        width = max(map(len, prompts))
        ids = torch.tensor([p + [3] * (width - len(p)) for p in prompts])
        return {"input_ids": ids, "input_features": features, "feature_lengths": lengths}

    two, three = audio(2, 37), audio(3, 50)
    step = torch.randint(3, 200, (2, 1), generator=generator)
    position_ids = torch.full((2, 1), two["input_ids"].shape[1])
    text = torch.randint(3, 200, (2, 9), generator=generator)
    return [
        {"name": "audio-lora-on", **two, "lora_gate": torch.tensor([1.0, 1.0]), "keep": True},
        {"name": "audio-lora-off", **two, "lora_gate": torch.tensor([0.0, 0.0])},
        {"name": "audio-mixed-batch3", **three, "lora_gate": torch.tensor([1.0, 0.0, 1.0])},
        {"name": "decode-lora-on", "input_ids": step, "position_ids": position_ids,
         "lora_gate": torch.tensor([1.0, 1.0]), "cache": "audio-lora-on"},
        {"name": "decode-lora-off", "input_ids": step, "position_ids": position_ids,
         "lora_gate": torch.tensor([0.0, 0.0]), "cache": "audio-lora-on"},
        {"name": "text-only", "input_ids": text, "eager_only": True},
    ]  # fmt: skip


def forward_cases(model, cases: list[dict], compiled: bool = False) -> dict[str, torch.Tensor]:
    """Each case's logits, in order, on `model` (eager or compiled, one process or a rank)."""
    logits, caches = {}, {}
    with torch.no_grad():
        for case in cases:
            if compiled and case.get("eager_only"):
                continue
            kwargs = {k: v for k, v in case.items() if isinstance(v, torch.Tensor)}
            if "cache" in case:
                kwargs["past_key_value_states"] = caches[case["cache"]]
            output, cache = model(**kwargs, use_cache=True)
            logits[case["name"]] = output
            if case.get("keep"):
                caches[case["name"]] = cache
    return logits


def generation_batches(cases: list[dict], eos: int, pad: int) -> list[tuple[dict, dict]]:
    """(tensors and prompts, settings) of two generate calls: greedy, and beams of 2."""
    batch = cases[2]  # three rows of different lengths
    prompts = [[t for t in row.tolist() if t != 3] for row in batch["input_ids"]]
    inputs = {
        "prompts": prompts,
        "features": batch["input_features"],
        "feature_lengths": batch["feature_lengths"],
    }
    settings = {"max_new_tokens": 5, "eos_token_id": eos, "pad_token_id": pad}
    return [(inputs, {**settings, "num_beams": 1}), (inputs, {**settings, "num_beams": 2})]


# ---- jobs


def _tensor_parallel(run_dir: Path, rank: int, inputs_path: str) -> int:
    from fms.distributed.strategy import TensorParallelStrategy
    from fms.models import get_model
    from fms.models.granite import GraniteConfig
    from torch._dynamo.utils import counters

    from fms_speech import distributed
    from fms_speech.checkpoint import index_aware_loading
    from fms_speech.compile import compile_model
    from fms_speech.models.granite_speech import GraniteSpeech, GraniteSpeechConfig

    saved = torch.load(inputs_path)
    launch = distributed.Launch.from_env()
    distributed.start(launch, torch.device("cpu"), timeout_seconds=300)
    result = {"rank": rank, "eager": {}, "local_heads": {}}
    models = {}
    for name, directory in saved["checkpoints"].items():
        with index_aware_loading():
            models[name] = get_model(
                "hf_pretrained", model_path=directory, distributed_strategy="tp"
            ).eval()
        attention = models[name].language_model.base_model.layers[0].attn
        result["local_heads"][name] = (type(attention).__name__, attention.nheads)
        result["eager"][name] = forward_cases(models[name], saved["cases"][name])

    # the compiled tensor-parallel model: the same logits, and how many graphs it took
    name = saved["compiled"]
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    result["compiled"] = forward_cases(compile_model(models[name]), saved["cases"][name], True)
    result["graphs"] = counters["stats"]["unique_graphs"] - before

    # rank 0 leads generations through Lockstep, with heartbeats in between; rank 1 follows
    lockstep = distributed.Lockstep(models[saved["generated"]], torch.device("cpu"))
    if lockstep.leads:
        result["sequences"] = []
        for inputs, settings in saved["generations"]:
            lockstep.heartbeat()
            batch = distributed.GenerationBatch(**inputs, settings=settings)
            result["sequences"].append(lockstep.run(batch).sequences)
        lockstep.close()
    else:
        result["followed"] = lockstep.follow()

    # a head count the world size does not divide: one sentence before anything is built
    text = GraniteConfig(src_vocab_size=64, emb_dim=24, nheads=3, kvheads=1, nlayers=1)
    try:
        with torch.device("meta"):
            GraniteSpeech(
                GraniteSpeechConfig(text_config=text), distributed_strategy=TensorParallelStrategy()
            )
    except ValueError as error:
        result["head_error"] = str(error)
    torch.save(result, run_dir / f"rank{rank}.pt")
    distributed.stop()
    return 0


def _leave() -> int:
    from fms_speech import distributed

    distributed.start(distributed.Launch.from_env(), torch.device("cpu"), timeout_seconds=60)
    return 0  # without leaving the group: as if the process had ended on its own


def main(argv: list[str]) -> int:
    run_dir, job, *args = argv
    run_dir = Path(run_dir)
    rank = int(os.environ["RANK"])
    (run_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    codes = []
    if os.environ.get(LEAVING_RANK) == str(rank):
        codes.append(_leave())
    elif job == "cli":
        from fms_speech.cli import main as cli_main

        commands = [[]]
        for arg in args:
            commands.append([]) if arg == "---" else commands[-1].append(arg)
        ports = os.environ.get(PORTS, "").split(",")
        for number, command in enumerate(commands):
            if number:  # as if launched anew: rank 0 hosts a fresh store on the next port
                os.environ["MASTER_PORT"] = ports[number - 1]
                os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
            codes.append(cli_main(command))
    elif job == "tensor-parallel":
        codes.append(_tensor_parallel(run_dir, rank, *args))
    else:
        raise ValueError(f"unknown job {job!r}")
    (run_dir / f"rank{rank}.exit").write_text(json.dumps(codes))
    return max(codes, default=0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
