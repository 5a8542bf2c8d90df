"""`fms-speech bench`'s options and entry point.

Light on purpose: `fms_speech.cli` imports this module for every command, and only `run`
imports the bench itself (torch.compile machinery, transformers' model code, matplotlib).
"""

import argparse
import sys
from importlib.util import find_spec
from pathlib import Path

from fms_speech.bench.settings import DTYPE_NAMES, GRID_WIDTHS, PARTS, SYSTEM_SLUGS

DESCRIPTION = """\
Measure the reference (transformers) and fms-speech, eager and compiled, on the same weights
and inputs, per stage; write a table, JSON, a Markdown report and plots to --output-dir.
The server under load (concurrent clients, one request at a time vs batched): fms-speech
bench serve --help. Experiments that go beyond the bench: python -m
fms_speech.bench.experiments.NAME --help (encoder, shapes, decode, decode_gemv, transcribe,
tensor_parallel)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--variant", help="a published shape with random weights, e.g. 3.3-2b, 5.0-470m"
    )
    source.add_argument(
        "--model", metavar="DIR", help="a checkpoint directory (granite_speech, _plus or 5.0)"
    )
    parser.add_argument("--encoder-layers", type=int, help="cut the variant's encoder depth")
    parser.add_argument("--llm-layers", type=int, help="cut the variant's LLM depth")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPE_NAMES))
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEM_SLUGS))
    parser.add_argument("--lengths", nargs="+", type=float, help="clip seconds (2 10 30)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="clips per batch (1 4)")
    parser.add_argument(
        "--compiled-batch-sizes", nargs="+", type=int, help="batch sizes for compiled systems"
    )
    parser.add_argument("--repeats", type=int, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, help="untimed runs first (the first is reported)")
    parser.add_argument("--max-new-tokens", type=int, help="greedy tokens per clip")
    parser.add_argument("--mixed-clips", type=int, help="clips in the mixed workload (16)")
    parser.add_argument("--mixed-batch", type=int, help="clips per batch in it (4)")
    parser.add_argument("--skip", nargs="+", choices=PARTS, default=[], help="parts to leave out")
    parser.add_argument(
        "--grid-widths",
        nargs="+",
        type=int,
        choices=GRID_WIDTHS,
        help="encoder widths of the encoder grid (default: all)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--profile", action="store_true", help="top ops per stage (torch.profiler)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: fp32, eager backend")
    parser.add_argument("--output-dir", type=Path, default=Path("bench-results"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)


def add_command(commands) -> argparse.ArgumentParser:
    """`bench` as a subcommand of `commands` (an argparse subparsers object)."""
    parser = commands.add_parser(
        "bench",
        help="measure the reference and fms-speech, eager and compiled",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


# what the bench needs beyond the library: the reference's LoRA, the plots, offline speech
BENCH_DEPENDENCIES = {
    "peft": "peft",
    "matplotlib": "matplotlib",
    "espeakng_loader": "espeakng-loader",
}


def missing_dependencies() -> list[str]:
    """The bench's packages that are not installed (pip names)."""
    return [pip for module, pip in BENCH_DEPENDENCIES.items() if find_spec(module) is None]


def run(args: argparse.Namespace) -> int:
    """Run the bench with parsed options; the exit code."""
    missing = missing_dependencies()
    if missing:
        print(
            f"fms-speech bench: error: the bench needs {', '.join(missing)}: "
            f"pip install {' '.join(missing)}",
            file=sys.stderr,
        )
        return 2
    from fms_speech.bench import run as bench_run  # the heavy part, only when the bench runs

    return bench_run.run_bench(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fms_speech.bench",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
