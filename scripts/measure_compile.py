"""Cold compile time of the full forward (audio prompt) and the number of graphs over shapes.

    python scripts/measure_compile.py [--variant 3.3-2b --layers N]

Random weights; set TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0 for a cold
compile, leave them for the warm-cache time of a second process.
"""

import argparse
import time

import torch
from fms.models import get_model
from torch._dynamo.utils import counters

import fms_speech  # noqa: F401
from fms_speech.compile import compile_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="3.3-2b")
    parser.add_argument("--encoder-layers", type=int, default=2)
    parser.add_argument("--llm-layers", type=int, default=2)
    args = parser.parse_args()
    model = get_model(
        "granite_speech",
        args.variant,
        encoder_config={"num_layers": args.encoder_layers},
        text_config={"nlayers": args.llm_layers},
    ).eval()
    compiled = compile_model(model)
    token = model.config.audio_token_index
    for batch, seconds in [(1, 3), (2, 10), (4, 30), (1, 60), (8, 1), (3, 17)]:
        frames = seconds * 50
        features = torch.randn(batch, frames, 160)
        count = int(model.audio_token_counts(features[:1]).item())
        ids = torch.tensor([[5] + [token] * count + [6, 7]] * batch)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(ids, input_features=features)
        elapsed = time.perf_counter() - start
        graphs = counters["stats"]["unique_graphs"]
        print(f"batch {batch} {seconds:>2d} s: {elapsed:7.2f} s, graphs so far {graphs}", flush=True)


if __name__ == "__main__":
    main()
