"""What `fms-speech bench` writes: targets, the printed table, JSON, Markdown and PNG plots."""

import datetime
import importlib.util
import json
import platform
from pathlib import Path

import torch

from fms_speech.bench_models import SYSTEMS

STAGES = ("features", "encoder", "projector", "prefill", "decode", "end_to_end")
STAGE_LABELS = {"decode": "decode / token", "end_to_end": "end to end"}
# the targets
ENCODER_VS_GEMM = 1.25
ENCODER_VS_REFERENCE_BF16 = 1.4
MIXED_VS_REFERENCE_COMPILED = 3.0
DECODE_VS_WEIGHTS = 1.3


def environment(device: torch.device, described: str, config, settings) -> dict:
    import fms
    import transformers

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
        "settings": dict(settings.__dict__),
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
                errors[name] = ((value - baseline).abs().max() / baseline.abs().max()).item()
    sample = next(iter(next(iter(tokens.values())).values()))[0] if tokens else []
    return {
        "tokens_agree": bool(tokens) and not disagreements,
        "compared": sorted({name for variants in tokens.values() for name in variants}),
        "disagreements": disagreements[:20],
        "sample_tokens": sample[:16],
        "first_logits_baseline": baseline_name,
        "first_logits_relative_error": errors,
    }


# ---- targets


def _get(mapping, *keys):
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def _target(name: str, goal: str, value: str | None, hit: bool | None, note: str = "") -> dict:
    status = "not measured" if hit is None else ("hit" if hit else "miss")
    return {"target": name, "goal": goal, "value": value or "-", "status": status, "note": note}


def _encoder_shape(results: dict) -> str | None:
    """The longest clip at the smallest batch that both fms compiled and reference eager ran."""
    fms_shapes = _get(results, "runs", "bfloat16", "fms compiled", "modules") or _get(
        results, "runs", "float32", "fms compiled", "modules"
    )
    if not fms_shapes:
        return None
    return max(fms_shapes, key=lambda s: (float(s.split("s")[0]), -int(s.split("x")[1])))


def targets(results: dict) -> list[dict]:
    return [
        *_encoder_targets(results),
        *_mixed_targets(results),
        _decode_target(results),
        _agreement_target(results.get("agreement", {})),
    ]


def _encoder_targets(results: dict) -> list[dict]:
    runs, machine = results["runs"], results.get("machine", {})
    shape = _encoder_shape(results)
    note = shape or ""
    if shape and not results["meta"]["is_3.3-2b"]:
        note += "; not the 3.3-2b shapes (run --variant 3.3-2b)"

    def encoder(dtype, system):
        return _get(runs, dtype, system, "modules", shape, "encoder", "median") if shape else None

    compiled_bf16 = encoder("bfloat16", "fms compiled")
    compiled_fp32 = encoder("float32", "fms compiled")
    reference_bf16 = encoder("bfloat16", "reference eager")
    reference_fp32 = encoder("float32", "reference eager")
    flops = _get(machine, "encoder_flops", "matmul")
    rate = _get(machine, "gemm_flops", "bfloat16")
    rows = []
    name, goal = "encoder bf16 compiled vs its matrix products alone", f"<= {ENCODER_VS_GEMM}x"
    if compiled_bf16 and flops and rate:
        gemm_seconds = flops * int(shape.split("x")[1]) / rate
        ratio = compiled_bf16 / gemm_seconds
        value = f"{_seconds(compiled_bf16)} vs {_seconds(gemm_seconds)}: {ratio:.2f}x"
        rows.append(_target(name, goal, value, ratio <= ENCODER_VS_GEMM, note))
    else:
        rows.append(_target(name, goal, None, None))
    name = "encoder bf16: reference eager / fms compiled"
    goal = f">= {ENCODER_VS_REFERENCE_BF16}x"
    if compiled_bf16 and reference_bf16:
        speedup = reference_bf16 / compiled_bf16
        value = f"{_seconds(reference_bf16)} / {_seconds(compiled_bf16)} = {speedup:.2f}x"
        rows.append(_target(name, goal, value, speedup >= ENCODER_VS_REFERENCE_BF16, note))
    else:
        rows.append(_target(name, goal, None, None))
    name, goal = "encoder fp32: fms compiled / reference eager", "<= 1x"
    if compiled_fp32 and reference_fp32:
        ratio = compiled_fp32 / reference_fp32
        value = f"{_seconds(compiled_fp32)} / {_seconds(reference_fp32)} = {ratio:.2f}x"
        rows.append(_target(name, goal, value, ratio <= 1, note))
    else:
        rows.append(_target(name, goal, None, None))
    return rows


def _agreement_target(agree: dict) -> dict:
    compared = agree.get("compared", [])
    return _target(
        "same greedy tokens in every system and dtype",
        "all equal",
        f"{len(compared)} system/dtype pairs compared",
        agree.get("tokens_agree") if compared else None,
        "; ".join(agree.get("disagreements", [])[:3]),
    )


def _mixed_targets(results: dict) -> list[dict]:
    rows = []
    runs, warm = results["runs"], results.get("warm_cache", {})
    for dtype, systems in runs.items():
        fms = _get(systems, "fms compiled", "mixed")
        ref_compiled = _get(systems, "reference compiled", "mixed")
        ref_eager = _get(systems, "reference eager", "mixed")
        name = f"mixed workload {dtype}: reference compiled / fms compiled (compile included)"
        if fms and ref_compiled:
            ratio = ref_compiled["first_pass"] / fms["first_pass"]
            value = (
                f"{_seconds(ref_compiled['first_pass'])} / {_seconds(fms['first_pass'])}"
                f" = {ratio:.2f}x"
            )
            rows.append(
                _target(
                    name,
                    f">= {MIXED_VS_REFERENCE_COMPILED}x",
                    value,
                    ratio >= MIXED_VS_REFERENCE_COMPILED,
                )
            )
        else:
            rows.append(_target(name, f">= {MIXED_VS_REFERENCE_COMPILED}x", None, None))
        name = f"mixed workload {dtype}: fms compiled, warm cache (2nd process) vs reference eager"
        warm_fms = _get(warm, dtype)
        if warm_fms and ref_eager:
            value = f"{_seconds(warm_fms['first_pass'])} vs {_seconds(ref_eager['first_pass'])}"
            rows.append(
                _target(name, "faster", value, warm_fms["first_pass"] < ref_eager["first_pass"])
            )
        else:
            rows.append(_target(name, "faster", None, None, _get(warm, "error") or ""))
        name = f"break-even audio, {dtype}: cold compile paid back against reference eager"
        if fms and ref_eager:
            per_audio_fms = fms["second_pass"] / fms["audio_seconds"]
            per_audio_ref = ref_eager["second_pass"] / ref_eager["audio_seconds"]
            saving = per_audio_ref - per_audio_fms  # seconds saved per second of audio
            if saving > 0:
                hours = fms["compile_seconds"] / saving / 3600
                value = f"{hours:.3g} h of audio ({_seconds(fms['compile_seconds'])} compile)"
            else:
                value = "never: compiled is not faster than reference eager in steady state"
            rows.append(_target(name, "measured", value, saving > 0))
    return rows


def _decode_target(results: dict) -> dict:
    name, goal = "decode step bf16 vs reading the weights once", f"<= {DECODE_VS_WEIGHTS}x"
    e2e = _get(results, "runs", "bfloat16", "fms compiled", "e2e")
    machine = results.get("machine", {})
    if not e2e or "memory_bandwidth" not in machine:
        return _target(name, goal, None, None)
    shape = min(e2e, key=lambda s: (int(s.split("x")[1]), -float(s.split("s")[0])))
    step = e2e[shape]["decode"]["median"]
    weight_seconds = machine["decode_weights"]["this model"] * 2 / machine["memory_bandwidth"]
    ratio = step / weight_seconds
    meta = results["meta"]
    if meta["is_3.3-2b"]:
        note = f"{shape}; {meta['llm_layers']} of 40 LLM layers"
    else:
        note = f"{shape}; not the 3.3-2b shapes (run --variant 3.3-2b)"
    value = f"{_seconds(step)} vs {_seconds(weight_seconds)}: {ratio:.2f}x"
    return _target(name, goal, value, ratio <= DECODE_VS_WEIGHTS, note)


# ---- text


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1:
        return f"{value:.3g} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    return f"{value * 1e6:.3g} us"


def _stage_stats(record: dict, shape: str, stage: str) -> dict | None:
    if stage in ("encoder", "projector"):
        return _get(record, "modules", shape, stage)
    return _get(record, "e2e", shape, stage)


def _shapes(results: dict) -> list[str]:
    names = {
        s
        for systems in results["runs"].values()
        for r in systems.values()
        for s in [*r.get("e2e", {}), *r.get("modules", {})]
    }
    return sorted(names, key=lambda s: (int(s.split("x")[1]), float(s.split("s")[0])))


def summary_table(results: dict) -> str:
    """End-to-end median per shape (and real-time factor) for every system and dtype."""
    lines = []
    for dtype, systems in results["runs"].items():
        names = [s for s in SYSTEMS if s in systems]
        lines.append(f"{dtype}: end to end, median (audio seconds per second)")
        lines.append("  " + f"{'shape':<10}" + "".join(f"{n:>24}" for n in names))
        for shape in _shapes(results):
            cells = []
            for name in names:
                e2e = _get(systems[name], "e2e", shape)
                cell = f"{_seconds(e2e['end_to_end']['median'])} ({e2e['rtf']:.3g})" if e2e else "-"
                cells.append(f"{cell:>24}")
            lines.append("  " + f"{shape:<10}" + "".join(cells))
    lines.append("targets:")
    for row in results["targets"]:
        lines.append(f"  [{row['status']}] {row['target']} ({row['goal']}): {row['value']}")
    return "\n".join(lines)


def write_all(results: dict, out_dir: Path) -> None:
    results["agreement"] = agreement(results)
    results["targets"] = targets(results)
    from fms_speech import bench_markdown

    results["plots"] = bench_markdown.plots(results, out_dir)
    profiles = bench_markdown.write_profiles(results, out_dir)
    (out_dir / "bench.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "bench.md").write_text(bench_markdown.markdown(results, profiles))
    print(summary_table(results))
    print(
        f"wrote {out_dir / 'bench.json'}, {out_dir / 'bench.md'} and {len(results['plots'])} plots"
    )
