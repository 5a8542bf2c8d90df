"""A whole bench run: one process, one checkpoint, the same inputs for every system.

- the systems (reference eager / compiled, fms eager / compiled, on CUDA also fms compiled with
  CUDA graphs), in each dtype asked for;
- per clip shape (length x batch): features, prefill, per-token decode and end to end (features
  + greedy generate of a fixed number of tokens), then encoder and projector alone;
- a mixed-length workload run twice per system from a fresh dynamo state: the first pass pays
  every compilation it triggers, the second is the steady state; a second process with the same
  inductor cache runs it again for fms compiled (the warm-cache compile), and a third on the
  artifacts `fms-speech compile` made (the precompiled warm start);
- the encoder alone over a grid of widths and batch sizes (bench.grid);
- compilations, recompilations and graph breaks per section; peak memory; machine rates.
The inductor cache starts empty (a temporary directory), so the compile times are cold ones.
"""

import argparse
import contextlib
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from fms.models import list_variants
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

from fms_speech import aot
from fms_speech.bench import ctc, report
from fms_speech.bench.checkpoints import load_fms, load_models
from fms_speech.bench.grid import time_grid
from fms_speech.bench.inputs import Prompter, make_workload
from fms_speech.bench.measure import counts_since, fresh_dynamo
from fms_speech.bench.parts import explain_graphs, machine_part, run_mixed, run_system
from fms_speech.bench.results import environment
from fms_speech.bench.settings import (
    DEFAULT_SYSTEMS,
    SYSTEM_SLUGS,
    SYSTEMS,
    Settings,
    settings_from_args,
)
from fms_speech.bench.systems import FmsSystem, PrecompiledSystem, make_system

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ARCHITECTURES = ("granite_speech", "granite_speech_plus", "granite_speech5")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run_bench(args: argparse.Namespace) -> int:
    if args.child:
        return child_main(args.child)
    problem = _bad_arguments(args)
    if problem:
        print(f"fms-speech bench: error: {problem}", file=sys.stderr)
        return 2
    settings = settings_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = [DTYPES[d] for d in (args.dtypes or (["float32"] if args.quick else list(DTYPES)))]
    dtypes.sort(key=lambda d: d != torch.float32)  # fp32 first: its weights are the originals
    if args.systems:
        systems = [SYSTEM_SLUGS[s] for s in args.systems]
    elif args.variant or args.model or args.quick:
        systems = [s for s in SYSTEMS if device.type == "cuda" or not s.endswith("cuda-graphs")]
    else:
        systems = list(DEFAULT_SYSTEMS)
        print(
            "bench: the embedded default leaves out 'reference compiled' (its recompilations take "
            "minutes here); add it with --systems ref-eager ref-compiled fms-eager fms-compiled",
            file=sys.stderr,
        )
    backend = "eager" if args.quick and args.backend == "inductor" else args.backend
    options = {"reference": {"backend": backend}, "fms": {"backend": backend}}
    if args.profile:
        inductor_config.cpp.enable_kernel_profile = True  # name the fused kernels in profiles
    if ctc.is_ctc_run(args):
        unsupported = [name for name in systems if name not in ctc.SYSTEMS]
        if args.systems and unsupported:
            print(
                f"fms-speech bench: error: a CTC model is benched as {', '.join(ctc.SYSTEMS)} "
                f"(not {', '.join(unsupported)})",
                file=sys.stderr,
            )
            return 2
        args.systems_ctc = [name for name in ctc.SYSTEMS if name in systems or not args.systems]
        args.output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="fms-speech-bench-") as work_dir:
            work = Path(work_dir)
            with temporary_cache_dir(str(work / "inductor")):
                results = ctc.run_ctc_bench(args, settings, device, dtypes, options["fms"], work)
        results["meta"]["command"] = command_line()
        ctc.write(results, args.output_dir)
        return 0
    args.output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # known before the first system runs: a partial report (a run stopped from outside) has it
    run_meta = dict(
        load_average_start=os.getloadavg(),
        backend=backend,
        systems=systems,
        command=command_line(),
    )
    with tempfile.TemporaryDirectory(prefix="fms-speech-bench-") as work_dir:
        work = Path(work_dir)
        with temporary_cache_dir(str(work / "inductor")):
            results = _measure(args, settings, device, dtypes, systems, work, options, run_meta)
    results["meta"].update(
        wall_seconds=time.perf_counter() - started, load_average_end=os.getloadavg()
    )
    report.write_all(results, args.output_dir)
    return 0


def _bad_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, in one sentence; None if nothing."""
    variants = [v for arch in ARCHITECTURES for v in list_variants(arch)]
    if args.variant and args.variant not in variants:
        return f"unknown --variant {args.variant!r} (one of {', '.join(variants)})"
    if args.model and not (Path(args.model) / "config.json").is_file():
        return f"--model {args.model} is not a checkpoint directory (no config.json)"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda but no GPU is usable"
    if args.device != "cuda" and any(s.endswith("cuda-graphs") for s in args.systems or []):
        return "the system fms-compiled-cuda-graphs needs --device cuda"
    return None


def command_line() -> str:
    """The run as one `fms-speech bench` command, however it was started."""
    argv = sys.argv[1:]
    if argv[:1] == ["bench"]:
        argv = argv[1:]
    return shlex.join(["fms-speech", "bench", *argv])


@contextlib.contextmanager
def _phase(name: str):
    started = time.perf_counter()
    yield
    print(f"bench: {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def _measure(
    args, settings: Settings, device, dtypes, systems, work: Path, options, run_meta: dict
) -> dict:
    with _phase("models"):
        models = load_models(args, work, dtypes[0], device)
    prompter = Prompter.for_model(models.fms, models.tokenizer_dir)
    with _phase("speech"):
        workload = make_workload(settings, prompter)
    results = {
        "meta": {**environment(device, models.described, models.fms.config, settings), **run_meta},
        "runs": {},
    }
    if "machine" in settings.parts:
        with _phase("machine rates"):
            results["machine"] = machine_part(settings, models.fms, device, dtypes, args.quick)
    if "explain" in settings.parts:
        with _phase("explain"):
            batch = workload.shapes[workload.agreement_shape]
            results["explain"] = explain_graphs(models.reference, models.fms, batch, device)
    for dtype in dtypes:
        models.reference.to(dtype)
        models.fms.to(dtype)
        runs = results["runs"].setdefault(dtype_name(dtype), {})
        for name in systems:
            system = make_system(name, models.reference, models.fms, device, options)
            with _phase(f"{name}, {dtype_name(dtype)}"):
                runs[name] = run_system(system, dtype, workload, settings, device, args.profile)
            _write_partial(results, args.output_dir)
    if "encoder-grid" in settings.parts:
        with _phase("encoder grid"):
            results["encoder_grid"] = time_grid(
                args.quick,
                torch.bfloat16,
                device,
                options["fms"],
                settings.repeats,
                args.grid_widths,
            )
        _write_partial(results, args.output_dir)
    if "warm-cache" in settings.parts and "mixed" in settings.parts:
        aot_cache = work / "aot"
        with _phase("precompiling (fms-speech compile)"):
            results["aot_build"] = build_artifacts(models.fms, dtypes, aot_cache)
        spec = {
            "checkpoint": str(models.checkpoint),
            "device": str(device),
            "dtypes": [dtype_name(d) for d in dtypes],
            "settings": {**settings.to_dict(), "parts": ["mixed"]},
            "tokenizer": models.tokenizer_dir,
            "compile_options": options["fms"],
            "threads": torch.get_num_threads(),
        }
        del models  # the child loads its own copy
        with _phase("warm-cache process"):
            results["warm_cache"] = run_warm_cache(spec, work)
        with _phase("precompiled process"):
            results["warm_cache"]["aot"] = run_warm_cache(
                {**spec, "aot_cache": str(aot_cache)}, work
            )
    return results


def _write_partial(results: dict, out_dir: Path) -> None:
    """What is measured so far, for `python -m fms_speech.bench.report` after a run stopped from
    outside (a time limit). The logits kept for the agreement table are left out."""
    runs = {
        dtype: {
            name: {k: v for k, v in record.items() if k != "first_logits"}
            for name, record in systems.items()
        }
        for dtype, systems in results["runs"].items()
    }
    partial = {**results, "runs": runs}
    (out_dir / "bench-partial.json").write_text(json.dumps(partial, indent=1, default=str))


def build_artifacts(model, dtypes, cache_dir: Path) -> dict:
    """`fms-speech compile` for each dtype: seconds per step, or the error."""
    built = {}
    for dtype in dtypes:
        model.to(dtype)
        started = time.perf_counter()
        try:
            report = aot.prepare(model, cache_dir)
        except Exception as error:  # noqa: BLE001  (a failed export is a result to report)
            built[dtype_name(dtype)] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            continue
        built[dtype_name(dtype)] = {
            "seconds": report.seconds,
            "total_seconds": time.perf_counter() - started,
        }
    return built


# ---- the warm-cache process


def run_warm_cache(spec: dict, work: Path) -> dict:
    """The mixed workload for fms compiled in a new process that shares the inductor cache, or
    (spec["aot_cache"]) on the artifacts precompiled there."""
    spec_path, result_path = work / "child-spec.json", work / "child-result.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    command = [sys.executable, "-m", "fms_speech.bench", "--child", str(spec_path)]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    process_seconds = time.perf_counter() - started
    if completed.returncode != 0:
        return {"error": (completed.stderr.strip().splitlines() or ["no output"])[-1]}
    return {**json.loads(result_path.read_text()), "process_seconds": process_seconds}


def child_main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    settings = Settings.from_dict(spec["settings"])
    dtypes = [DTYPES[d] for d in spec["dtypes"]]
    model = load_fms(Path(spec["checkpoint"]), dtypes[0], device)
    workload = make_workload(settings, Prompter.for_model(model, spec.get("tokenizer")))
    results = {}
    for dtype in dtypes:
        model.to(dtype)
        start_counts = fresh_dynamo()
        if spec.get("aot_cache"):
            system = PrecompiledSystem(model, device, spec["aot_cache"])
        else:
            system = FmsSystem(model, True, device, spec["compile_options"])
        try:
            with system:
                mixed = run_mixed(system, workload.mixed, settings, workload.eos, device)
        except RuntimeError as error:  # e.g. no artifacts: reported, the other dtypes go on
            results[dtype_name(dtype)] = {"error": str(error).splitlines()[0][:300]}
            continue
        mixed["compiles"] = counts_since(start_counts)
        if isinstance(system, PrecompiledSystem):
            mixed["load_seconds"] = system.load_seconds
            mixed["calls"] = dict(system.precompiled.calls)
        results[dtype_name(dtype)] = mixed
    results["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(spec["result"]).write_text(json.dumps(results))
    return 0
