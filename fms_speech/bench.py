"""`fms-speech bench`: the reference against fms-speech, eager against compiled, measured.

One process, one checkpoint, the same inputs for every system (see `bench_models`):
- four systems (reference eager / compiled, fms eager / compiled), in each dtype asked for;
- per clip shape (length x batch): features, prefill, per-token decode and end to end (features
  + greedy generate of a fixed number of tokens), then encoder and projector alone;
- a mixed-length workload run twice per system from a fresh dynamo state: the first pass pays
  every compilation it triggers, the second is the steady state; a second process with the same
  inductor cache runs it again for fms compiled (the warm-cache compile);
- compilations, recompilations and graph breaks per section; peak memory; machine rates.
The inductor cache starts empty (a temporary directory), so the compile times are cold ones.
"""

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fms_speech import bench_models as models
from fms_speech import bench_report, roofline
from fms_speech.bench_measure import (
    PeakMemory,
    counts_since,
    explain_graphs,
    fresh_dynamo,
    profile_call,
    summary,
    timed,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PARTS = ("e2e", "modules", "mixed", "warm-cache", "explain", "machine")
DEFAULT_SYSTEMS = ("reference eager", "fms eager", "fms compiled")


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


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--variant", help="a published shape with random weights, e.g. 3.3-2b")
    source.add_argument("--model", metavar="DIR", help="a Granite Speech checkpoint directory")
    parser.add_argument("--encoder-layers", type=int, help="cut the variant's encoder depth")
    parser.add_argument("--llm-layers", type=int, help="cut the variant's LLM depth")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    parser.add_argument("--systems", nargs="+", choices=list(models.SYSTEM_SLUGS))
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
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--cuda-graphs", action="store_true", help="fms compiled: reduce-overhead")
    parser.add_argument("--profile", action="store_true", help="top ops per stage (torch.profiler)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: fp32, eager backend")
    parser.add_argument("--output-dir", type=Path, default=Path("bench-results"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)


def _settings(args) -> Settings:
    real = bool(args.variant or args.model)
    if args.quick:
        default = Settings([2], [1, 2], 1, 1, 3, 2, 2, (1, 4), PARTS, [2])
    elif real:
        default = Settings([2, 10, 30], [1, 4], 3, 1, 16, 16, 4, (1, 30), PARTS, [1, 4])
    else:
        default = Settings([2, 10, 30], [1, 4], 3, 1, 16, 16, 4, (1, 30), PARTS, [4])
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


def runs_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- the parts


def run_e2e(system, batch: models.Batch, eos, settings: Settings, device) -> dict:
    first, _ = timed(lambda: system.generate(batch, settings.max_new_tokens, eos), device)
    for _ in range(settings.warmup - 1):
        system.generate(batch, settings.max_new_tokens, eos)
    runs = []
    for _ in range(settings.repeats):
        seconds, generated = timed(
            lambda: system.generate(batch, settings.max_new_tokens, eos), device
        )
        runs.append((seconds, generated))
    steps = runs[-1][1].decode_steps
    end_to_end = summary([s for s, _ in runs])
    return {
        "first_call": first,
        "features": summary([g.features_seconds for _, g in runs]),
        "prefill": summary([g.prefill_seconds for _, g in runs]),
        "decode": summary([g.decode_seconds / max(1, g.decode_steps) for _, g in runs]),
        "end_to_end": end_to_end,
        "decode_steps": steps,
        "audio_seconds": batch.audio_seconds,
        "rtf": batch.audio_seconds / end_to_end["median"],
        "tokens": runs[-1][1].sequences,
        "first_logits": runs[-1][1].first_logits,  # the reference's; fms: see _first_logits
    }


def _module_timing(fn, settings: Settings, device) -> tuple[dict, torch.Tensor]:
    with torch.no_grad():
        first, output = timed(fn, device)
        for _ in range(settings.warmup - 1):
            fn()
        times = [timed(fn, device)[0] for _ in range(settings.repeats)]
    return {"first_call": first, **summary(times)}, output


def run_modules(system, batch: models.Batch, dtype, settings: Settings, device) -> dict:
    features, lengths = models.features_of(batch, device)
    features = features.to(dtype)
    encoder, states = _module_timing(lambda: system.encode(features, lengths), settings, device)
    projector, _ = _module_timing(lambda: system.project(states, lengths), settings, device)
    return {"encoder": encoder, "projector": projector}


def run_mixed(system, batches: list[models.Batch], settings: Settings, eos, device) -> dict:
    passes = []
    for _ in range(2):
        seconds, _ = timed(
            lambda: [system.generate(b, settings.max_new_tokens, eos) for b in batches], device
        )
        passes.append(seconds)
    audio = sum(b.audio_seconds for b in batches)
    return {
        "first_pass": passes[0],
        "second_pass": passes[1],
        "compile_seconds": max(0.0, passes[0] - passes[1]),
        "audio_seconds": audio,
        "rtf_first_pass": audio / passes[0],
        "rtf_second_pass": audio / passes[1],
    }


@dataclass
class Workload:
    shapes: dict[str, models.Batch]  # "10s x4" -> batch of equal-length clips
    mixed: list[models.Batch]
    eos: int | None
    agreement_shape: str


def shape_name(seconds: float, batch: int) -> str:
    return f"{seconds:g}s x{batch}"


def make_workload(settings: Settings, prompter, eos) -> Workload:
    shapes = {}
    for seconds in settings.lengths:
        for batch in sorted(set(settings.batch_sizes) | set(settings.compiled_batch_sizes)):
            clips = [models.speech_clip(seconds, seed=100 * i + 7) for i in range(batch)]
            shapes[shape_name(seconds, batch)] = models.make_batch(clips, prompter)
    mixed = []
    if "mixed" in settings.parts:
        low, high = settings.mixed_range
        generator = torch.Generator().manual_seed(2024)
        lengths = low + (high - low) * torch.rand(settings.mixed_clips, generator=generator)
        clips = [models.speech_clip(float(s), seed=i) for i, s in enumerate(lengths.tolist())]
        for start in range(0, len(clips), settings.mixed_batch):
            mixed.append(models.make_batch(clips[start : start + settings.mixed_batch], prompter))
    middle = sorted(settings.lengths)[len(settings.lengths) // 2]
    common = set(settings.batch_sizes) & set(settings.compiled_batch_sizes)
    agreement = shape_name(middle, max(common or settings.compiled_batch_sizes))
    return Workload(shapes, mixed, eos, agreement)


def run_system(system, dtype, workload: Workload, settings: Settings, device, profile) -> dict:
    """Every part for one system in one dtype. A part that fails is recorded, not raised: the
    reference under torch.compile is allowed to break, and that is a result."""
    record: dict = {"seconds": {}}
    start_counts = fresh_dynamo()
    with system, PeakMemory(device) as memory:
        if "mixed" in settings.parts and workload.mixed:
            with _part(record, "mixed"):
                record["mixed"] = run_mixed(system, workload.mixed, settings, workload.eos, device)
                record["mixed"]["compiles"] = counts_since(start_counts)
        if "e2e" in settings.parts:
            with _part(record, "e2e"):
                record["e2e"] = _run_shapes(system, workload, settings, run_e2e, workload.eos)
                record["first_logits"] = _first_logits(system, workload, record["e2e"])
        record["compiles"] = counts_since(start_counts)
        if profile:
            with _part(record, "profile"):
                longest = max(workload.shapes.values(), key=lambda b: b.audio_seconds)
                tokens = settings.max_new_tokens
                record["profile"] = {
                    "generate": profile_call(
                        lambda: system.generate(longest, tokens, workload.eos), device
                    )
                }
    record["memory"] = memory.result
    if "modules" in settings.parts:
        start_counts = fresh_dynamo()
        with _part(record, "modules"):
            if system.compiled:
                system.compile_modules()
            record["modules"] = _run_shapes(system, workload, settings, run_modules, dtype)
            if profile:
                record.setdefault("profile", {}).update(_profile_modules(system, workload, dtype))
        record["modules_compiles"] = counts_since(start_counts)
    return record


@contextlib.contextmanager
def _part(record: dict, name: str):
    started = time.perf_counter()
    try:
        yield
    except Exception as error:  # noqa: BLE001  (a broken system is a result to report)
        first_line = (str(error).strip().splitlines() or [""])[0]
        message = f"{type(error).__name__}: {first_line[:300]}"
        record.setdefault("errors", {})[name] = message
        print(f"bench: {name} failed: {message}", file=sys.stderr, flush=True)
    record["seconds"][name] = time.perf_counter() - started


def _run_shapes(system, workload: Workload, settings: Settings, run, extra) -> dict:
    sizes = settings.compiled_batch_sizes if system.compiled else settings.batch_sizes
    device = system.device
    return {
        name: run(system, batch, extra, settings, device)
        for name, batch in workload.shapes.items()
        if len(batch.waveforms) in sizes
    }


def _first_logits(system, workload: Workload, e2e: dict):
    if isinstance(system, models.FmsSystem):
        return system.first_logits(workload.shapes[workload.agreement_shape])
    logits = e2e[workload.agreement_shape]["first_logits"]
    for shape in e2e.values():
        del shape["first_logits"]
    return logits


def _profile_modules(system, workload: Workload, dtype) -> dict:
    longest = max(
        (b for b in workload.shapes.values() if len(b.waveforms) == 1),
        key=lambda b: b.audio_seconds,
        default=max(workload.shapes.values(), key=lambda b: b.audio_seconds),
    )
    features, lengths = models.features_of(longest, system.device)
    features = features.to(dtype)
    with torch.no_grad():
        states = system.encode(features, lengths)
    return {
        "encoder": profile_call(lambda: system.encode(features, lengths), system.device),
        "projector": profile_call(lambda: system.project(states, lengths), system.device),
    }


# ---- the warm-cache process


def run_warm_cache(spec: dict, work: Path) -> dict:
    """The mixed workload for fms compiled in a new process that shares the inductor cache."""
    spec_path, result_path = work / "child-spec.json", work / "child-result.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    command = [sys.executable, "-m", "fms_speech.bench", "--child", str(spec_path)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        return {"error": (completed.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(result_path.read_text())


def child_main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    settings = Settings(
        **{**spec["settings"], "mixed_range": tuple(spec["settings"]["mixed_range"])}
    )
    dtypes = [DTYPES[d] for d in spec["dtypes"]]
    model = models.load_fms(Path(spec["checkpoint"]), dtypes[0], device)
    prompter = _prompter(model, spec.get("tokenizer"))
    workload = make_workload(settings, prompter, spec["eos"])
    results = {}
    for dtype in dtypes:
        model.to(dtype)
        start_counts = fresh_dynamo()
        system = models.FmsSystem(model, True, device, spec["compile_options"])
        with system:
            mixed = run_mixed(system, workload.mixed, settings, workload.eos, device)
        mixed["compiles"] = counts_since(start_counts)
        results[runs_name(dtype)] = mixed
    results["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(spec["result"]).write_text(json.dumps(results))
    return 0


# ---- the whole run


def _prompter(fms_model, tokenizer_dir) -> models.Prompter:
    tokenizer = None
    if tokenizer_dir:
        from fms_speech.prompts import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
    projector = fms_model.config.projector_config
    return models.Prompter(
        fms_model.config.audio_token_index,
        projector.window_size,
        projector.downsample_rate,
        tokenizer,
    )


def _load_models(args, work: Path, dtype, device):
    """(reference, fms model, checkpoint dir, config description, tokenizer dir or None)."""
    if args.model:
        directory = Path(args.model)
        reference = models.load_reference(directory, dtype).to(device)
        has_tokenizer = (directory / "tokenizer_config.json").is_file()
        described = f"checkpoint {directory}"
        return (
            reference,
            models.load_fms(directory, dtype, device),
            directory,
            described,
            (str(directory) if has_tokenizer else None),
        )
    directory = work / "checkpoint"
    if args.variant:
        config = models.variant_config(args.variant, args.encoder_layers, args.llm_layers)
        lora = models.PUBLISHED_LORA
        described = f"{args.variant} shapes, random weights"
    else:
        config = models.embedded_config()
        lora = models.EMBEDDED_LORA
        described = "embedded default (small, random weights)"
    reference = models.build_checkpoint(config, directory, dtype, lora).to(device)
    return reference, models.load_fms(directory, dtype, device), directory, described, None


def _machine_part(args, settings, fms_model, device, dtypes) -> dict:
    machine = roofline.machine_rates(device, dtypes, quick=args.quick)
    encoder = fms_model.config.encoder_config
    longest_frames = int(max(settings.lengths) * 50)
    machine["encoder_flops"] = roofline.encoder_flops(encoder, longest_frames)
    machine["encoder_flops_seconds"] = max(settings.lengths)
    text = fms_model.config.text_config
    weights = roofline.decode_weight_count(fms_model.language_model, text.tie_heads)
    published = roofline.variant_decode_weight_count("3.3-2b")
    machine["decode_weights"] = {"this model": weights, "3.3-2b": published}
    return machine


def run_bench(args: argparse.Namespace) -> int:
    if args.child:
        return child_main(args.child)
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    settings = _settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fms-speech bench: error: --device cuda but no GPU is usable", file=sys.stderr)
        return 2
    dtypes = [DTYPES[d] for d in (args.dtypes or (["float32"] if args.quick else list(DTYPES)))]
    dtypes.sort(key=lambda d: d != torch.float32)  # fp32 first: its weights are the originals
    if args.systems:
        systems = [models.SYSTEM_SLUGS[s] for s in args.systems]
    elif args.variant or args.model or args.quick:
        systems = models.SYSTEMS
    else:
        systems = DEFAULT_SYSTEMS
        print(
            "bench: the embedded default leaves out 'reference compiled' (its recompilations take "
            "minutes here); add it with --systems ref-eager ref-compiled fms-eager fms-compiled",
            file=sys.stderr,
        )
    backend = "eager" if args.quick and args.backend == "inductor" else args.backend
    ref_options = {"backend": backend}
    fms_options = {"backend": backend}
    if args.cuda_graphs and device.type == "cuda":
        fms_options["mode"] = "reduce-overhead"
    if args.profile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # name the fused kernels in profiles
    args.output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fms-speech-bench-") as work_dir:
        work = Path(work_dir)
        with temporary_cache_dir(str(work / "inductor")):
            results = _measure(
                args, settings, device, dtypes, systems, work, ref_options, fms_options
            )
    results["meta"].update(
        wall_seconds=time.perf_counter() - started,
        load_average_start=load_before,
        load_average_end=os.getloadavg(),
        backend=backend,
        systems=list(systems),
        command=" ".join(sys.argv),
    )
    bench_report.write_all(results, args.output_dir)
    return 0


@contextlib.contextmanager
def _phase(name: str):
    started = time.perf_counter()
    yield
    print(f"bench: {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def _measure(args, settings, device, dtypes, systems, work, ref_options, fms_options) -> dict:
    with _phase("models"):
        reference, fms_model, checkpoint, described, tokenizer_dir = _load_models(
            args, work, dtypes[0], device
        )
    prompter = _prompter(fms_model, tokenizer_dir)
    eos = prompter.tokenizer.eos_token_id if tokenizer_dir else None
    with _phase("speech"):
        workload = make_workload(settings, prompter, eos)
    results = {
        "meta": bench_report.environment(device, described, fms_model.config, settings),
        "runs": {},
    }
    if "machine" in settings.parts:
        with _phase("machine rates"):
            results["machine"] = _machine_part(args, settings, fms_model, device, dtypes)
    if "explain" in settings.parts:
        with _phase("explain"):
            results["explain"] = explain_graphs(
                reference, fms_model, workload.shapes[workload.agreement_shape], device
            )
    for dtype in dtypes:
        reference.to(dtype)
        fms_model.to(dtype)
        runs = results["runs"].setdefault(runs_name(dtype), {})
        for name in systems:
            compiled = name.endswith("compiled")
            if name.startswith("reference"):
                system = models.ReferenceSystem(reference, compiled, device, ref_options)
            else:
                system = models.FmsSystem(fms_model, compiled, device, fms_options)
            with _phase(f"{name}, {runs_name(dtype)}"):
                runs[name] = run_system(system, dtype, workload, settings, device, args.profile)
    if "warm-cache" in settings.parts and "mixed" in settings.parts:
        spec = {
            "checkpoint": str(checkpoint),
            "device": str(device),
            "dtypes": [runs_name(d) for d in dtypes],
            "settings": {**settings.__dict__, "parts": ["mixed"]},
            "eos": eos,
            "tokenizer": tokenizer_dir,
            "compile_options": fms_options,
            "threads": torch.get_num_threads(),
        }
        del reference, fms_model  # the child loads its own copy
        with _phase("warm-cache process"):
            results["warm_cache"] = run_warm_cache(spec, work)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fms_speech.bench", description=__doc__)
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
