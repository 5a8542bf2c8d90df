"""The results of a bench run as the report reads them: the environment, lookups into the
nested dicts, shapes, stages, seconds as text, and the agreement between systems."""

import datetime
import importlib.util
import platform

import fms
import torch
import transformers

from fms_speech.bench.settings import ClipShape, Settings
from fms_speech.testing.reference import relative_error

STAGES = ("features", "encoder", "projector", "prefill", "decode", "end_to_end")
STAGE_LABELS = {"decode": "decode / token", "end_to_end": "end to end"}


def environment(device: torch.device, described: str, config, settings: Settings) -> dict:
    """The report's `meta`: model, shapes, device, versions, settings."""
    enc, text = config.encoder_config, config.text_config
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": described,
        "shapes": (
            f"encoder {enc.num_layers} x {enc.hidden_dim}, LLM {text.nlayers} x {text.emb_dim}, "
            f"vocab {text.src_vocab_size}, LoRA rank {config.lora_rank}"
        ),
        "is_3.3-2b": (enc.hidden_dim, text.emb_dim, text.src_vocab_size) == (1024, 2048, 49160),
        "llm_layers": text.nlayers,
        "device": _device_name(device),
        "threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "ibm-fms": getattr(fms, "__version__", "?"),
        },
        "settings": settings.to_dict(),
        "features_note": (
            "every system uses fms_speech.audio.log_mel: the reference's feature extractor "
            + (
                "is available but is not timed here"
                if importlib.util.find_spec("torchaudio")
                else "needs torchaudio, which is not installed"
            )
        ),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            name = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        name = platform.processor() or "cpu"
    return f"{name} (CPU)"


# ---- reading the results


def lookup(mapping, *keys):
    """mapping[k1][k2]..., or None where a key is missing."""
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def format_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1:
        return f"{value:.3g} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    return f"{value * 1e6:.3g} us"


def stage_stats(record: dict, shape: ClipShape, stage: str) -> dict | None:
    """{'median', 'min', 'max'} of one stage of one system at one shape, or None."""
    part = "modules" if stage in ("encoder", "projector") else "e2e"
    return lookup(record, part, shape.key, stage)


def shapes_of(section: dict) -> list[ClipShape]:
    """The shapes of one part's results ({shape key: ...})."""
    return [ClipShape.from_key(key) for key in section]


def all_shapes(results: dict) -> list[ClipShape]:
    """Every shape any system ran, by batch size, then length."""
    shapes = {
        shape
        for systems in results["runs"].values()
        for record in systems.values()
        for shape in [*shapes_of(record.get("e2e", {})), *shapes_of(record.get("modules", {}))]
    }
    return sorted(shapes, key=lambda s: (s.batch, s.seconds))


def longest_smallest_batch(shapes: list[ClipShape]) -> ClipShape:
    """The longest clips, at the smallest batch among them."""
    return max(shapes, key=lambda s: (s.seconds, -s.batch))


# ---- agreement


def agreement(results: dict) -> dict:
    """Tokens of every (system, dtype) per shape, and first-step logits against one baseline.

    Removes the logits tensors from `results` (they do not go to JSON).
    """
    tokens: dict[str, dict[str, list]] = {}
    logits = {}
    for dtype, systems in results["runs"].items():
        for system, record in systems.items():
            logits[f"{system}, {dtype}"] = record.pop("first_logits", None)
            for shape, e2e in record.get("e2e", {}).items():
                tokens.setdefault(shape, {})[f"{system}, {dtype}"] = e2e["tokens"]
    disagreements = []
    for shape, variants in tokens.items():
        (base_name, base), *others = variants.items()
        for name, sequences in others:
            for row, (a, b) in enumerate(zip(base, sequences, strict=True)):
                if a != b:
                    position = next(
                        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), 0
                    )
                    disagreements.append(
                        f"{shape}, row {row}: {name} differs from {base_name} at token {position}"
                    )
    baseline_name = next((n for n in logits if n.startswith("reference eager")), None)
    errors = {}
    if baseline_name is not None and logits[baseline_name] is not None:
        baseline = logits[baseline_name]
        for name, value in logits.items():
            if value is not None and value.shape == baseline.shape:
                errors[name] = relative_error(value, baseline)
    sample = next(iter(next(iter(tokens.values())).values()))[0] if tokens else []
    return {
        "tokens_agree": bool(tokens) and not disagreements,
        "compared": sorted({name for variants in tokens.values() for name in variants}),
        "disagreements": disagreements[:20],
        "sample_tokens": sample[:16],
        "first_logits_baseline": baseline_name,
        "first_logits_relative_error": errors,
    }


# ---- warm start and break-even


def format_audio(seconds: float | None) -> str:
    """Seconds of audio as s, min or h."""
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def _steady(mixed: dict | None) -> float | None:
    """Seconds per second of audio in the steady (second) pass of the mixed workload."""
    if not mixed or "second_pass" not in mixed:
        return None
    return mixed["second_pass"] / mixed["audio_seconds"]


def warm_start_overhead(mixed: dict | None) -> float | None:
    """A precompiled process's compile overhead: loading the artifacts plus what its first pass
    of the mixed workload took beyond its steady pass."""
    if not mixed or "first_pass" not in mixed:
        return None
    return mixed.get("load_seconds", 0.0) + max(0.0, mixed["first_pass"] - mixed["second_pass"])


def break_even(results: dict, dtype: str) -> list[dict]:
    """Per way of compiling: its overhead, its steady speed, and the audio after which it beats
    the reference eager and fms-speech eager (None: never, it is not faster)."""
    systems = results["runs"].get(dtype, {})
    jit = lookup(systems, "fms compiled", "mixed")
    warm_jit = lookup(results, "warm_cache", dtype)
    aot = lookup(results, "warm_cache", "aot", dtype)
    build = lookup(results, "aot_build", dtype, "total_seconds")
    paths = []
    if jit and "compile_seconds" in jit:
        paths.append(("compiled just in time, cold caches", jit["compile_seconds"], _steady(jit)))
    if warm_jit and "compile_seconds" in warm_jit:
        label = "compiled just in time, warm inductor cache (2nd process)"
        paths.append((label, warm_jit["compile_seconds"], _steady(warm_jit)))
    if aot and "first_pass" in aot:
        if build is not None:
            label = "precompiled: fms-speech compile once, then a process"
            paths.append((label, build + warm_start_overhead(aot), _steady(aot)))
        label = "precompiled, warm start (a process on the artifacts)"
        paths.append((label, warm_start_overhead(aot), _steady(aot)))
    baselines = {
        name: _steady(lookup(systems, name, "mixed")) for name in ("reference eager", "fms eager")
    }
    rows = []
    for label, overhead, steady in paths:
        row = {"path": label, "overhead_seconds": overhead, "seconds_per_audio_second": steady}
        for name, eager in baselines.items():
            if eager is None or steady is None:
                row[name] = "not measured"
            elif eager > steady:  # seconds saved per second of audio
                row[name] = overhead / (eager - steady)
            else:
                row[name] = None
        rows.append(row)
    return rows
