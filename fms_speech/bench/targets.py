"""The issue's targets, each a row {target, goal, value, status, note} from a run's results.

A target whose numbers are missing (a part skipped, a dtype not run) is "not measured".
"""

from fms_speech.bench.results import (
    break_even,
    format_audio,
    format_seconds,
    longest_smallest_batch,
    lookup,
    shapes_of,
    warm_start_overhead,
)

ENCODER_VS_GEMM = 1.25
ENCODER_VS_REFERENCE_BF16 = 1.4
MIXED_VS_REFERENCE_COMPILED = 3.0
DECODE_VS_WEIGHTS = 1.3
WARM_START_SECONDS = 3.0
NOT_3_3_2B = "not the 3.3-2b shapes (run --variant 3.3-2b)"


def targets(results: dict) -> list[dict]:
    return [
        *_encoder_targets(results),
        *_mixed_targets(results),
        *_warm_start_targets(results),
        *_grid_targets(results),
        _decode_target(results),
        _agreement_target(results.get("agreement", {})),
    ]


def _target(name: str, goal: str, value: str | None, hit: bool | None, note: str = "") -> dict:
    status = "not measured" if hit is None else ("hit" if hit else "miss")
    return {"target": name, "goal": goal, "value": value or "-", "status": status, "note": note}


def _encoder_targets(results: dict) -> list[dict]:
    runs, machine = results["runs"], results.get("machine", {})
    fms_shapes = lookup(runs, "bfloat16", "fms compiled", "modules") or lookup(
        runs, "float32", "fms compiled", "modules"
    )
    shape = note = None
    if fms_shapes:  # the longest clip at the smallest batch fms compiled ran
        shape = longest_smallest_batch(shapes_of(fms_shapes))
        note = shape.key if results["meta"]["is_3.3-2b"] else f"{shape.key}; {NOT_3_3_2B}"

    def encoder(dtype, system):
        if shape is None:
            return None
        return lookup(runs, dtype, system, "modules", shape.key, "encoder", "median")

    compiled_bf16 = encoder("bfloat16", "fms compiled")
    compiled_fp32 = encoder("float32", "fms compiled")
    reference_bf16 = encoder("bfloat16", "reference eager")
    reference_fp32 = encoder("float32", "reference eager")
    flops = lookup(machine, "encoder_flops", "matmul")
    rate = lookup(machine, "gemm_flops", "bfloat16")
    rows = []
    name, goal = "encoder bf16 compiled vs its matrix products alone", f"<= {ENCODER_VS_GEMM}x"
    if compiled_bf16 and flops and rate:
        gemm_seconds = flops * shape.batch / rate
        ratio = compiled_bf16 / gemm_seconds
        value = f"{format_seconds(compiled_bf16)} vs {format_seconds(gemm_seconds)}: {ratio:.2f}x"
        rows.append(_target(name, goal, value, ratio <= ENCODER_VS_GEMM, note))
    else:
        rows.append(_target(name, goal, None, None))
    rows.append(
        _quotient_target(
            "encoder bf16: reference eager / fms compiled",
            f">= {ENCODER_VS_REFERENCE_BF16}x",
            reference_bf16,
            compiled_bf16,
            lambda ratio: ratio >= ENCODER_VS_REFERENCE_BF16,
            note,
        )
    )
    rows.append(
        _quotient_target(
            "encoder fp32: fms compiled / reference eager",
            "<= 1x",
            compiled_fp32,
            reference_fp32,
            lambda ratio: ratio <= 1,
            note,
        )
    )
    return rows


def _quotient_target(name, goal, numerator, denominator, hit, note="") -> dict:
    """'a / b = r' and whether `hit(r)`; not measured where either is missing."""
    if not (numerator and denominator):
        return _target(name, goal, None, None)
    ratio = numerator / denominator
    value = f"{format_seconds(numerator)} / {format_seconds(denominator)} = {ratio:.2f}x"
    return _target(name, goal, value, hit(ratio), note)


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
        fms = lookup(systems, "fms compiled", "mixed")
        ref_compiled = lookup(systems, "reference compiled", "mixed")
        ref_eager = lookup(systems, "reference eager", "mixed")
        rows.append(
            _quotient_target(
                f"mixed workload {dtype}: reference compiled / fms compiled (compile included)",
                f">= {MIXED_VS_REFERENCE_COMPILED}x",
                ref_compiled and ref_compiled["first_pass"],
                fms and fms["first_pass"],
                lambda ratio: ratio >= MIXED_VS_REFERENCE_COMPILED,
            )
        )
        name = f"mixed workload {dtype}: fms compiled, warm cache (2nd process) vs reference eager"
        warm_fms = lookup(warm, dtype)
        if warm_fms and ref_eager:
            first, reference_first = warm_fms["first_pass"], ref_eager["first_pass"]
            value = f"{format_seconds(first)} vs {format_seconds(reference_first)}"
            rows.append(_target(name, "faster", value, first < reference_first))
        else:
            rows.append(_target(name, "faster", None, None, lookup(warm, "error") or ""))
        for row in break_even(results, dtype):
            if row["path"].startswith(("compiled just in time, cold", "precompiled, warm")):
                audio = row["reference eager"]
                if audio == "not measured":
                    continue
                name = f"break-even {dtype}, {row['path']}: audio to beat reference eager"
                value = (
                    f"{format_audio(audio)} ({format_seconds(row['overhead_seconds'])} overhead)"
                )
                rows.append(_target(name, "measured", value, audio is not None))
    return rows


def _warm_start_targets(results: dict) -> list[dict]:
    rows = []
    for dtype in results["runs"]:
        aot = lookup(results, "warm_cache", "aot", dtype)
        name = f"warm start {dtype}: compile overhead of a precompiled process"
        goal = f"<= {WARM_START_SECONDS:g} s"
        overhead = warm_start_overhead(aot)
        if overhead is None:
            error = lookup(results, "aot_build", dtype, "error") or lookup(aot or {}, "error")
            rows.append(_target(name, goal, None, None, error or ""))
            continue
        value = (
            f"{format_seconds(overhead)} (load {format_seconds(aot['load_seconds'])}, first pass "
            f"{format_seconds(aot['first_pass'])} vs {format_seconds(aot['second_pass'])})"
        )
        note = "" if not results["meta"]["is_3.3-2b"] else "3.3-2b shapes"
        rows.append(_target(name, goal, value, overhead <= WARM_START_SECONDS, note))
    return rows


def _grid_targets(results: dict) -> list[dict]:
    grid = results.get("encoder_grid")
    if not grid:
        return []
    rows = []
    for width, record in grid["widths"].items():
        for shape, stats in record["shapes"].items():
            rows.append(
                _quotient_target(
                    f"encoder grid {grid['dtype']}, {width}, {shape}: reference eager / fms "
                    "compiled",
                    f">= {ENCODER_VS_REFERENCE_BF16}x",
                    stats["reference eager"]["median"],
                    stats["fms compiled"]["median"],
                    lambda ratio: ratio >= ENCODER_VS_REFERENCE_BF16,
                )
            )
    return rows


def _decode_target(results: dict) -> dict:
    name, goal = "decode step bf16 vs reading the weights once", f"<= {DECODE_VS_WEIGHTS}x"
    e2e = lookup(results, "runs", "bfloat16", "fms compiled", "e2e")
    machine = results.get("machine", {})
    if not e2e or "memory_bandwidth" not in machine:
        return _target(name, goal, None, None)
    # the smallest batch (a matrix-vector step), its longest clips
    shape = min(shapes_of(e2e), key=lambda s: (s.batch, -s.seconds))
    step = e2e[shape.key]["decode"]["median"]
    weight_seconds = machine["decode_weights"]["this model"] * 2 / machine["memory_bandwidth"]
    ratio = step / weight_seconds
    meta = results["meta"]
    if meta["is_3.3-2b"]:
        note = f"{shape.key}; {meta['llm_layers']} of 40 LLM layers"
    else:
        note = f"{shape.key}; {NOT_3_3_2B}"
    value = f"{format_seconds(step)} vs {format_seconds(weight_seconds)}: {ratio:.2f}x"
    return _target(name, goal, value, ratio <= DECODE_VS_WEIGHTS, note)
