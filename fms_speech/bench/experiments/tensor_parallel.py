"""Prefill and decode-step times: tensor parallel over the torchrun ranks against one process.

    torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29600 \\
        -m fms_speech.bench.experiments.tensor_parallel \\
        --variant 3.3-2b --llm-layers 8 --encoder-layers 4

Random weights at a published variant's widths (fewer layers, so that it fits and runs in
minutes on a CPU; a step's time grows with the layers), fp32. Rounds alternate, side by side in
one launch: all ranks generate one batch tensor-parallel (rank 0 leading through
fms_speech.distributed.Lockstep), then rank 0 alone generates it with a whole model on as many
threads as there are ranks while the others wait. Rank 0 prints one JSON line per round and a
summary with the medians and os.getloadavg().
"""

import argparse
import dataclasses
import json
import os
import statistics

import torch
from fms.models import get_model

import fms_speech  # noqa: F401  (registers granite_speech)
from fms_speech import distributed
from fms_speech.audio import FEATURE_DIM, FRAMES_PER_SECOND
from fms_speech.compile import compile_model
from fms_speech.models.granite_speech import GraniteSpeechConfig


def _model(args, config: GraniteSpeechConfig, **load_options):
    torch.manual_seed(0)  # every rank draws the same replicated weights
    with torch.device("cpu"):
        model = get_model(
            "granite_speech",
            args.variant,
            encoder_config=dataclasses.replace(
                config.encoder_config, num_layers=args.encoder_layers
            ),
            text_config=dataclasses.replace(config.text_config, nlayers=args.llm_layers),
            **load_options,
        ).eval()
    return compile_model(model) if args.compile else model


def _batch(args, model) -> distributed.GenerationBatch:
    generator = torch.Generator().manual_seed(1)
    frames = int(args.seconds * FRAMES_PER_SECOND)
    features = torch.randn(args.batch, frames, FEATURE_DIM, generator=generator)
    lengths = torch.full((args.batch,), frames)
    count = int(model.audio_token_counts(features[:1], lengths[:1]).item())
    audio = model.config.audio_token_index
    prompts = [[5, 6, 7, *[audio] * count, 8, 9, 10]] * args.batch
    # an eos id no token has: exactly max_new_tokens steps, the same on every rank
    settings = {"max_new_tokens": args.steps + 1, "eos_token_id": -1, "pad_token_id": 0}
    return distributed.GenerationBatch(prompts, features, lengths, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="3.3-2b")
    parser.add_argument("--llm-layers", type=int, default=8)
    parser.add_argument("--encoder-layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio per row")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    launch = distributed.Launch.from_env()
    if launch is None or launch.world_size < 2:
        raise SystemExit("run this under torchrun with at least 2 processes")
    distributed.start(launch, torch.device("cpu"), timeout_seconds=3600)
    leads = launch.rank == 0
    torch.set_num_threads(1)  # one core per rank (torchrun's OMP_NUM_THREADS=1), said here
    own_group = distributed.single_rank_group()  # collective: every rank makes the groups
    variant = get_model("granite_speech", args.variant, device_type="meta", group=own_group)
    config = variant.get_config()
    tensor_parallel = _model(args, config, distributed_strategy="tp")
    lockstep = distributed.Lockstep(tensor_parallel, torch.device("cpu"))
    if not leads:  # the other ranks wait inside follow() while rank 0 runs its whole model
        lockstep.follow()
        distributed.stop()
        return
    whole = _model(args, config, group=own_group)
    batch = _batch(args, tensor_parallel)
    rounds = []
    for number in range(args.rounds + 1):  # round 0 warms up (and compiles)
        parallel = lockstep.run(batch)
        torch.set_num_threads(launch.world_size)  # the same cores as the ranks together
        single = batch.generate(whole)
        torch.set_num_threads(1)
        if number == 0:
            continue
        row = {
            "round": number,
            "tp_prefill_s": parallel.prefill_seconds,
            "tp_decode_ms_per_step": 1e3 * parallel.decode_seconds / parallel.decode_steps,
            "single_prefill_s": single.prefill_seconds,
            "single_decode_ms_per_step": 1e3 * single.decode_seconds / single.decode_steps,
            "same_tokens": parallel.sequences == single.sequences,
            "loadavg": os.getloadavg(),
        }
        rounds.append(row)
        print(json.dumps(row), flush=True)
    lockstep.close()
    keys = [k for k in rounds[0] if k.endswith(("_s", "_step"))]
    summary = {**vars(args), "world_size": launch.world_size}
    summary |= {k: statistics.median(r[k] for r in rounds) for k in keys}
    summary["tp_over_single_decode"] = (
        summary["tp_decode_ms_per_step"] / summary["single_decode_ms_per_step"]
    )
    summary["tp_over_single_prefill"] = summary["tp_prefill_s"] / summary["single_prefill_s"]
    summary["loadavg"] = os.getloadavg()
    print(json.dumps(summary), flush=True)
    distributed.stop()


if __name__ == "__main__":
    main()
