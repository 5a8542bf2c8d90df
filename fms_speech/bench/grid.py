"""The encoder alone over a grid of widths and batch sizes: the reference eager against
fms-speech eager and compiled (issue 12: compiled bf16 at least 1.4x faster than the reference's
bf16 eager at 30 s, at every width, batch 1 and 4).

Random weights, the same in both implementations (ours initialised, then copied into
transformers' `GraniteSpeechCTCEncoder` through the checkpoint key mapping). The three are
timed in turns, round after round, so that load on a shared machine falls on all of them alike.
"""

import os
import time
from dataclasses import dataclass

import torch

from fms_speech.audio import FEATURE_DIM, FRAMES_PER_SECOND
from fms_speech.bench.measure import summary, timed
from fms_speech.compile import compile_model
from fms_speech.models.conformer import ConformerConfig, ConformerEncoder
from fms_speech.testing.reference import randomize, reference_encoder

IMPLEMENTATIONS = ("reference eager", "fms eager", "fms compiled")


@dataclass(frozen=True)
class EncoderWidth:
    """One encoder shape of the grid; the rest is the published encoder's."""

    hidden: int
    layers: int
    heads: int
    dim_head: int

    @property
    def key(self) -> str:
        return f"{self.hidden} wide, {self.layers} layers"

    def config(self) -> ConformerConfig:
        return ConformerConfig(
            num_layers=self.layers,
            hidden_dim=self.hidden,
            num_heads=self.heads,
            dim_head=self.dim_head,
        )


# the embedded default's width, a mid width (issue 12 measured 6 x 512 at 1.34-1.38x), and the
# published width with fewer layers (every layer is alike: the ratio does not depend on depth)
DEFAULT_GRID = (
    EncoderWidth(256, 4, 4, 64),
    EncoderWidth(512, 6, 8, 64),
    EncoderWidth(1024, 4, 8, 128),
)
QUICK_GRID = (EncoderWidth(32, 1, 2, 16),)


def _encoders(width: EncoderWidth, dtype: torch.dtype, device: torch.device):
    torch.manual_seed(0)
    ours = ConformerEncoder(width.config())
    randomize(ours, scale=0.05)
    ours = ours.to(device=device, dtype=dtype).eval()
    return ours, reference_encoder(ours, dtype).to(device)


def _calls(reference, ours, compiled, features, lengths) -> dict:
    return {
        "reference eager": lambda: reference(features).last_hidden_state,
        "fms eager": lambda: ours(features, lengths),
        "fms compiled": lambda: compiled(features, lengths),
    }


def run_grid(
    grid,
    seconds: float,
    batch_sizes: list[int],
    dtype: torch.dtype,
    device: torch.device,
    compile_options: dict,
    repeats: int,
) -> dict:
    """{width key: {'compile_seconds', 'shapes': {'30s x1': {implementation: stats}}}}."""
    frames = int(seconds * FRAMES_PER_SECOND)
    results = {}
    for width in grid:
        ours, reference = _encoders(width, dtype, device)
        torch._dynamo.reset()
        compiled = compile_model(ours, **compile_options)
        record = {"config": vars(width), "shapes": {}, "compile_seconds": None}
        for batch in batch_sizes:
            features = torch.randn(batch, frames, FEATURE_DIM, device=device).to(dtype)
            lengths = torch.full((batch,), frames, device=device)
            calls = _calls(reference, ours, compiled, features, lengths)
            with torch.no_grad():
                first, _ = timed(calls["fms compiled"], device)  # compiles at the first batch
                if record["compile_seconds"] is None:
                    record["compile_seconds"] = first
                for call in calls.values():  # warm-up
                    call()
                times = {name: [] for name in calls}
                for _ in range(repeats):
                    for name, call in calls.items():
                        times[name].append(timed(call, device)[0])
            record["shapes"][f"{seconds:g}s x{batch}"] = {
                **{name: summary(values) for name, values in times.items()},
                "load_average": os.getloadavg()[0],
            }
        results[width.key] = record
    return results


def time_grid(
    args_quick: bool,
    dtype,
    device,
    compile_options: dict,
    repeats: int,
    hidden_sizes: list[int] | None = None,
) -> dict:
    """The grid of the bench (QUICK_GRID at 2 s with --quick), with its settings;
    `hidden_sizes` keeps only DEFAULT_GRID's widths of those hidden sizes."""
    grid = QUICK_GRID if args_quick else DEFAULT_GRID
    if hidden_sizes and not args_quick:
        grid = tuple(width for width in grid if width.hidden in hidden_sizes)
    seconds, batches = (2.0, [1, 2]) if args_quick else (30.0, [1, 4])
    started = time.perf_counter()
    widths = run_grid(grid, seconds, batches, dtype, device, compile_options, repeats)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": seconds,
        "batch_sizes": batches,
        "repeats": repeats,
        "widths": widths,
        "wall_seconds": time.perf_counter() - started,
    }
