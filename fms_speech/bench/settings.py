"""What a bench run measures: the systems, dtypes, parts, clip shapes and repeat counts.

Imports nothing heavy: the command line reads it to build `fms-speech bench`'s options.
"""

import argparse
import re
from dataclasses import asdict, dataclass, field

SYSTEMS = (
    "reference eager",
    "reference compiled",
    "fms eager",
    "fms compiled",
    "fms compiled cuda-graphs",  # CUDA only: mode="reduce-overhead"
)
SYSTEM_SLUGS = {name.replace("reference", "ref").replace(" ", "-"): name for name in SYSTEMS}
# the embedded default leaves out 'reference compiled': its recompilations take minutes on a CPU
DEFAULT_SYSTEMS = ("reference eager", "fms eager", "fms compiled")
DTYPE_NAMES = ("float32", "bfloat16")
PARTS = ("e2e", "modules", "mixed", "warm-cache", "encoder-grid", "explain", "machine")
# the hidden sizes of the encoder grid's widths (bench.grid.DEFAULT_GRID), for --grid-widths
GRID_WIDTHS = (256, 512, 1024)


@dataclass(frozen=True)
class ClipShape:
    """Clips of `seconds` each, `batch` of them in one call."""

    seconds: float
    batch: int

    _KEY = re.compile(r"\s*(\d+(?:\.\d*)?)\s*s\s*x\s*(\d+)\s*")

    @property
    def key(self) -> str:
        """The name in the JSON report and the tables: '10s x4'."""
        return f"{self.seconds:g}s x{self.batch}"

    @classmethod
    def from_key(cls, key: str) -> "ClipShape":
        """The inverse of `key` (spaces optional: '10sx4' too)."""
        match = cls._KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"not a clip shape: {key!r} (expected e.g. '10s x4')")
        return cls(float(match[1]), int(match[2]))


@dataclass
class Settings:
    lengths: list[float]
    batch_sizes: list[int]
    repeats: int
    warmup: int
    max_new_tokens: int
    mixed_clips: int
    mixed_batch: int
    mixed_range: tuple[float, float]
    parts: tuple[str, ...]
    compiled_batch_sizes: list[int] = field(default_factory=list)

    def shapes(self) -> list[ClipShape]:
        """Every (length, batch) that some system runs, batch sizes of all systems together."""
        batches = sorted(set(self.batch_sizes) | set(self.compiled_batch_sizes))
        return [ClipShape(seconds, batch) for seconds in self.lengths for batch in batches]

    def agreement_shape(self) -> ClipShape:
        """The middle length at the largest batch every system runs: where logits are compared."""
        middle = sorted(self.lengths)[len(self.lengths) // 2]
        common = set(self.batch_sizes) & set(self.compiled_batch_sizes)
        return ClipShape(middle, max(common or self.compiled_batch_sizes))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Settings":
        return cls(
            **{
                **values,
                "mixed_range": tuple(values["mixed_range"]),
                "parts": tuple(values["parts"]),
            }
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The run's settings: the defaults of the model source, then the command line's values."""
    real = bool(args.variant or args.model)
    if args.quick:
        default = Settings([2], [1, 2], 1, 1, 3, 2, 2, (1, 4), PARTS, [2])
    elif real:
        default = Settings([2, 10, 30], [1, 4], 3, 1, 16, 16, 4, (1, 30), PARTS, [1, 4])
    else:
        default = Settings([2, 10, 30], [1, 4], 3, 1, 16, 16, 4, (1, 30), PARTS, [1, 4])
    skip = set(args.skip) | ({"warm-cache"} if args.quick else set())
    return Settings(
        lengths=args.lengths or default.lengths,
        batch_sizes=args.batch_sizes or default.batch_sizes,
        repeats=args.repeats or default.repeats,
        warmup=max(1, args.warmup or default.warmup),
        max_new_tokens=args.max_new_tokens or default.max_new_tokens,
        mixed_clips=args.mixed_clips or default.mixed_clips,
        mixed_batch=args.mixed_batch or default.mixed_batch,
        mixed_range=default.mixed_range,
        parts=tuple(p for p in PARTS if p not in skip),
        compiled_batch_sizes=args.compiled_batch_sizes
        or args.batch_sizes
        or default.compiled_batch_sizes,
    )
