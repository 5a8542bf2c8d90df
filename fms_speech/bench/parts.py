"""The parts of a bench run, each measured for one system in one dtype (`run_system`), and the
ones measured once per run (`explain_graphs`, `machine_part`).

Every measurement goes into plain dicts (the JSON report): shapes under `ClipShape.key`.
"""

import contextlib
import sys
import time

import torch

from fms_speech.audio import FRAMES_PER_SECOND
from fms_speech.bench import roofline
from fms_speech.bench.inputs import (
    Batch,
    Workload,
    audio_features_mask,
    features_of,
    left_pad,
)
from fms_speech.bench.measure import (
    PeakMemory,
    counts_since,
    fresh_dynamo,
    profile_call,
    repeat_timed,
    summary,
    time_calls,
    timed,
)
from fms_speech.bench.settings import Settings
from fms_speech.bench.systems import FmsSystem, model_dtype


def run_e2e(system, batch: Batch, eos, settings: Settings, device) -> dict:
    """Features + greedy generate of `max_new_tokens`, timed per stage."""
    first, runs = repeat_timed(
        lambda: system.generate(batch, settings.max_new_tokens, eos),
        device,
        settings.warmup,
        settings.repeats,
    )
    generated = [g for _, g in runs]
    end_to_end = summary([seconds for seconds, _ in runs])
    return {
        "first_call": first,
        "features": summary([g.features_seconds for g in generated]),
        "prefill": summary([g.prefill_seconds for g in generated]),
        "decode": summary([g.decode_seconds / max(1, g.decode_steps) for g in generated]),
        "end_to_end": end_to_end,
        "decode_steps": generated[-1].decode_steps,
        "audio_seconds": batch.audio_seconds,
        "rtf": batch.audio_seconds / end_to_end["median"],
        "tokens": generated[-1].sequences,
        "first_logits": generated[-1].first_logits,  # the reference's; fms: see _first_logits
    }


def run_modules(system, batch: Batch, dtype, settings: Settings, device) -> dict:
    """The encoder and the projector alone."""
    features, lengths = features_of(batch, device)
    features = features.to(dtype)
    with torch.no_grad():
        encoder = time_calls(
            lambda: system.encode(features, lengths), device, settings.warmup, settings.repeats
        )
        states = system.encode(features, lengths)
        projector = time_calls(
            lambda: system.project(states, lengths), device, settings.warmup, settings.repeats
        )
    return {"encoder": encoder, "projector": projector}


def run_mixed(system, batches: list[Batch], settings: Settings, eos, device) -> dict:
    """The mixed-length workload twice: the first pass pays every compilation it triggers."""
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
    return {
        shape.key: run(system, batch, extra, settings, system.device)
        for shape, batch in workload.shapes.items()
        if shape.batch in sizes
    }


def _first_logits(system, workload: Workload, e2e: dict):
    if isinstance(system, FmsSystem):
        return system.first_logits(workload.shapes[workload.agreement_shape])
    logits = e2e[workload.agreement_shape.key]["first_logits"]
    for shape in e2e.values():
        del shape["first_logits"]
    return logits


def _profile_modules(system, workload: Workload, dtype) -> dict:
    longest = max(
        (b for shape, b in workload.shapes.items() if shape.batch == 1),
        key=lambda b: b.audio_seconds,
        default=max(workload.shapes.values(), key=lambda b: b.audio_seconds),
    )
    features, lengths = features_of(longest, system.device)
    features = features.to(dtype)
    with torch.no_grad():
        states = system.encode(features, lengths)
    return {
        "encoder": profile_call(lambda: system.encode(features, lengths), system.device),
        "projector": profile_call(lambda: system.project(states, lengths), system.device),
    }


def explain_graphs(reference, fms_model, batch: Batch, device) -> dict:
    """torch._dynamo.explain of each implementation's prefill forward (graphs and breaks)."""
    features, lengths = features_of(batch, device)
    ids, attention = left_pad(batch.prompts, device)
    mask = audio_features_mask(ids, reference.config.audio_token_index)
    result = {}
    with torch.no_grad():
        torch._dynamo.reset()
        ref = torch._dynamo.explain(reference)(
            input_ids=ids,
            attention_mask=attention,
            input_features=features.to(reference.dtype),
            input_features_mask=mask,
            use_cache=True,
        )
        torch._dynamo.reset()
        ours = torch._dynamo.explain(fms_model)(
            ids, input_features=features.to(model_dtype(fms_model)), feature_lengths=lengths
        )
        torch._dynamo.reset()
    for name, explanation in (("reference", ref), ("fms", ours)):
        reasons = [str(r.reason).splitlines()[0][:160] for r in explanation.break_reasons]
        result[name] = {
            "graphs": explanation.graph_count,
            "graph_breaks": explanation.graph_break_count,
            "break_reasons": sorted(set(reasons)),
        }
    return result


def machine_part(settings: Settings, fms_model, device, dtypes, quick: bool) -> dict:
    """The machine's rates and this model's FLOPs and decode weights (the targets' bounds)."""
    machine = roofline.machine_rates(device, dtypes, quick=quick)
    longest = max(settings.lengths)
    frames = int(longest * FRAMES_PER_SECOND)
    machine["encoder_flops"] = roofline.encoder_flops(fms_model.config.encoder_config, frames)
    machine["encoder_flops_seconds"] = longest
    text = fms_model.config.text_config
    weights = roofline.decode_weight_count(fms_model.language_model, text.tie_heads)
    published = roofline.variant_decode_weight_count("3.3-2b")
    machine["decode_weights"] = {"this model": weights, "3.3-2b": published}
    return machine
