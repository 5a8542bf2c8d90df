"""The Markdown report and the profile tables of `fms-speech bench`."""

from pathlib import Path

from fms_speech.bench.results import (
    STAGE_LABELS,
    STAGES,
    all_shapes,
    break_even,
    format_audio,
    format_seconds,
    lookup,
    stage_stats,
)
from fms_speech.bench.settings import SYSTEMS


def _cell(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{format_seconds(stats['median'])} [{format_seconds(stats['min'])}–{format_seconds(stats['max'])}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _mib(value: int) -> str:
    return f"{value / 2**20:.0f} MiB"


def _seconds(value: float | None) -> str:
    # a partial report (run stopped from outside) has no end
    return "? (stopped before its end)" if value is None else f"{value:.0f} s"


def _load(values: list[float] | None) -> str:
    return "?" if values is None else f"{values[0]:.2f}"


def markdown(results: dict, profiles: dict[str, str]) -> str:
    meta = results["meta"]
    lines = [
        "# fms-speech bench",
        "",
        f"- model: {meta['model']} ({meta['shapes']})",
        f"- device: {meta['device']}, {meta['threads']} threads; compile backend "
        f"{meta.get('backend')}",
        f"- {meta['date']}; " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- run time {_seconds(meta.get('wall_seconds'))}; load average "
        f"{_load(meta.get('load_average_start'))} at start, "
        f"{_load(meta.get('load_average_end'))} at end (other work on the machine adds noise)",
        f"- features: {meta['features_note']}",
        f"- greedy generation of {meta['settings']['max_new_tokens']} tokens per clip; "
        f"{meta['settings']['warmup']} warm-up call(s), then median [min–max] of "
        f"{meta['settings']['repeats']}",
        f"- systems: {', '.join(meta.get('systems', []))}"
        + (
            ""
            if "reference compiled" in meta.get("systems", [])
            else " (the reference under torch.compile was left out: add it with --systems)"
        ),
        f"- command: `{meta.get('command', '')}`",
        "",
        "## Targets",
        "",
    ]
    lines += _table(
        ["target", "goal", "measured", "status", "note"],
        [
            [t["target"], t["goal"], t["value"], f"**{t['status']}**", t["note"]]
            for t in results["targets"]
        ],
    )
    lines += _agreement_section(results.get("agreement", {}))
    for dtype, systems in results["runs"].items():
        names = [s for s in SYSTEMS if s in systems]
        lines += [f"## Stages, {dtype}", ""]
        rows = []
        for shape in all_shapes(results):
            for stage in STAGES:
                cells = [_cell(stage_stats(systems[n], shape, stage)) for n in names]
                if any(c != "-" for c in cells):
                    rows.append([shape.key, STAGE_LABELS.get(stage, stage), *cells])
            rtf = [lookup(systems[n], "e2e", shape.key, "rtf") for n in names]
            if any(rtf):
                rtf_cells = [f"{r:.3g}" if r else "-" for r in rtf]
                rows.append([shape.key, "audio s per s", *rtf_cells])
        lines += _table(["shape", "stage", *names], rows)
    lines += _errors_section(results)
    lines += _mixed_section(results)
    lines += _break_even_section(results)
    lines += _grid_section(results)
    lines += _compile_section(results)
    lines += _machine_section(results)
    lines += _explain_section(results.get("explain"))
    if profiles:
        lines += ["## Profiles", ""]
        lines += [f"- [{name}]({file})" for name, file in profiles.items()]
        lines.append("")
    for plot in results.get("plots", []):
        lines += [f"![{plot}]({plot})", ""]
    return "\n".join(lines)


def _agreement_section(agree: dict) -> list[str]:
    lines = ["## Agreement", ""]
    lines.append(
        f"Greedy tokens equal in all {len(agree.get('compared', []))} system/dtype pairs: "
        f"**{agree.get('tokens_agree')}** (first tokens of one clip: {agree.get('sample_tokens')})."
    )
    for line in agree.get("disagreements", []):
        lines.append(f"- {line}")
    errors = agree.get("first_logits_relative_error", {})
    if errors:
        lines += [
            "",
            f"First-step logits, max |x - y| / max |y| against "
            f"{agree.get('first_logits_baseline')}:",
            "",
        ]
        lines += _table(
            ["system, dtype", "relative error"],
            [[name, f"{error:.2e}"] for name, error in errors.items()],
        )
    return lines + [""]


def _errors_section(results: dict) -> list[str]:
    rows = [
        [f"{name}, {dtype}", part, message.replace("|", "\\|")]
        for dtype, systems in results["runs"].items()
        for name, record in systems.items()
        for part, message in record.get("errors", {}).items()
    ]
    if not rows:
        return []
    lines = ["## Failures", "", "Parts that raised; their numbers are missing above.", ""]
    return lines + _table(["system", "part", "error"], rows)


def _mixed_row(label: str, record: dict) -> list[str]:
    counts = record["compiles"]
    return [
        label,
        format_seconds(record["first_pass"]),
        format_seconds(record["second_pass"]),
        format_seconds(record["compile_seconds"]),
        f"{record['rtf_first_pass']:.3g}",
        f"{record['rtf_second_pass']:.3g}",
        f"{counts['graphs']} / {counts['recompiles']} / {counts['graph_breaks']}",
    ]


def _mixed_section(results: dict) -> list[str]:
    rows = []
    for dtype, systems in results["runs"].items():
        for name in SYSTEMS:
            mixed = lookup(systems, name, "mixed")
            if not mixed:
                continue
            rows.append(_mixed_row(f"{name}, {dtype}", mixed))
        warm = lookup(results, "warm_cache", dtype)
        if warm and "first_pass" in warm:
            rows.append(_mixed_row(f"fms compiled, {dtype}, second process (warm cache)", warm))
        aot = lookup(results, "warm_cache", "aot", dtype)
        if aot and "first_pass" in aot:
            label = f"fms precompiled, {dtype}, second process (load {aot['load_seconds']:.2f} s)"
            rows.append(_mixed_row(label, aot))
    if not rows:
        return []
    settings = results["meta"]["settings"]
    lines = [
        "## Mixed-length workload",
        "",
        f"{settings['mixed_clips']} clips of {settings['mixed_range'][0]:g}–"
        f"{settings['mixed_range'][1]:g} s in batches of {settings['mixed_batch']}, features + "
        "greedy generate, run twice from a fresh dynamo state: the first pass pays every "
        "compilation it triggers (cold inductor cache), the second is the steady state.",
        "",
    ]
    lines += _table(
        [
            "system",
            "first pass",
            "second pass",
            "compile (1st - 2nd)",
            "audio s/s 1st",
            "audio s/s 2nd",
            "graphs / recompiles / breaks",
        ],
        rows,
    )
    return lines


def _break_even_section(results: dict) -> list[str]:
    rows = []
    for dtype in results["runs"]:
        for row in break_even(results, dtype):
            steady = row["seconds_per_audio_second"]
            rows.append(
                [
                    f"{row['path']}, {dtype}",
                    format_seconds(row["overhead_seconds"]),
                    f"{steady:.3g}" if steady else "-",
                    *(
                        row[name] if row[name] == "not measured" else format_audio(row[name])
                        for name in ("reference eager", "fms eager")
                    ),
                ]
            )
    builds = results.get("aot_build", {})
    if not rows and not builds:
        return []
    lines = [
        "## Warm start and break-even",
        "",
        "Overhead: what compiling adds before the steady state (mixed workload: first pass "
        "minus second pass; a precompiled process adds loading its artifacts; the first "
        "precompiled row adds making them). Break-even: the audio after which the compiled "
        "run, overhead included, has taken less time than the eager one (steady speeds of "
        "the mixed workload's second pass).",
        "",
    ]
    lines += _table(
        [
            "path, dtype",
            "overhead",
            "steady s per audio s",
            "beats reference eager after",
            "beats fms eager after",
        ],
        rows,
    )
    for dtype, build in builds.items():
        if "error" in build:
            lines.append(f"- `fms-speech compile`, {dtype}: failed: {build['error']}")
        else:
            steps = ", ".join(f"{k} {format_seconds(v)}" for k, v in build["seconds"].items())
            lines.append(
                f"- `fms-speech compile`, {dtype}: {format_seconds(build['total_seconds'])} "
                f"({steps})"
            )
    return lines + [""]


def _grid_section(results: dict) -> list[str]:
    grid = results.get("encoder_grid")
    if not grid:
        return []
    names = ("reference eager", "fms eager", "fms compiled")
    rows = []
    for width, record in grid["widths"].items():
        for shape, stats in record["shapes"].items():
            ratio = stats["reference eager"]["median"] / stats["fms compiled"]["median"]
            rows.append(
                [
                    width,
                    shape,
                    *(_cell(stats[name]) for name in names),
                    f"{ratio:.2f}x",
                    f"{stats['load_average']:.1f}",
                ]
            )
    lines = [
        f"## Encoder grid, {grid['dtype']}",
        "",
        f"The encoder alone at {grid['seconds']:g} s per clip, random weights shared by both "
        "implementations, timed in turns (median [min–max] of "
        f"{grid['repeats']}); compiled per width with compile_model (batch 1 first, then "
        "batch 4).",
        "",
    ]
    return lines + _table(
        ["encoder", "clips", *names, "reference / compiled", "load average"], rows
    )


def _compile_section(results: dict) -> list[str]:
    rows = []
    for dtype, systems in results["runs"].items():
        for name in SYSTEMS:
            record = systems.get(name)
            if not record:
                continue
            whole, modules = record.get("compiles", {}), record.get("modules_compiles", {})
            reasons = "; ".join(whole.get("recompile_reasons", [])[:3])
            rows.append(
                [
                    f"{name}, {dtype}",
                    f"{whole.get('graphs', '-')} / {whole.get('recompiles', '-')} / "
                    f"{whole.get('graph_breaks', '-')}",
                    f"{modules.get('graphs', '-')} / {modules.get('recompiles', '-')} / "
                    f"{modules.get('graph_breaks', '-')}",
                    _mib(record["memory"]["above_start_bytes"]),
                    ", ".join(f"{k} {v:.0f} s" for k, v in record.get("seconds", {}).items()),
                    reasons.replace("|", "\\|")[:300],
                ]
            )
    lines = [
        "## Compilations and memory",
        "",
        "Counts since a fresh dynamo state: mixed workload + all shapes end to end; then "
        "encoder and projector compiled alone. Memory: peak above the level at the start "
        "of the system's end-to-end part (CPU: sampled RSS; CUDA: allocator peak).",
        "",
    ]
    return lines + _table(
        [
            "system",
            "graphs / recompiles / breaks (generate)",
            "same (encoder, projector)",
            "peak memory",
            "bench time per part",
            "recompile reasons",
        ],
        rows,
    )


def _machine_section(results: dict) -> list[str]:
    machine = results.get("machine")
    if not machine:
        return []
    lines = ["## Machine and model bounds", ""]
    for dtype, rate in machine["gemm_flops"].items():
        lines.append(f"- {dtype} GEMM ({machine['gemm_size']}^3): {rate / 1e9:.0f} GFLOP/s")
    bandwidth = machine["memory_bandwidth"]
    lines.append(f"- memory bandwidth (sum of a large tensor): {bandwidth / 1e9:.1f} GB/s")
    flops = machine["encoder_flops"]
    lines.append(
        f"- encoder at {machine['encoder_flops_seconds']:g} s, batch 1: "
        f"{flops['matmul'] / 1e9:.1f} GFLOP in matrix products, {flops['conv'] / 1e9:.2f} in "
        "convolutions; at the GEMM rates: "
        + ", ".join(
            f"{d} {format_seconds(flops['matmul'] / r)}" for d, r in machine["gemm_flops"].items()
        )
    )
    for name, count in machine["decode_weights"].items():
        lines.append(
            f"- decode step weights ({name}): {count / 1e6:.0f} M; reading them once takes "
            f"{format_seconds(count * 2 / bandwidth)} in bf16, {format_seconds(count * 4 / bandwidth)} in fp32"
        )
    return lines + [""]


def _explain_section(explain: dict | None) -> list[str]:
    if not explain:
        return []
    lines = ["## Graphs and graph breaks of one prefill forward (torch._dynamo.explain)", ""]
    for name, result in explain.items():
        lines.append(f"- {name}: {result['graphs']} graphs, {result['graph_breaks']} breaks")
        lines += [f"  - {reason}" for reason in result["break_reasons"][:8]]
    return lines + [""]


def write_profiles(results: dict, out_dir: Path) -> dict[str, str]:
    written = {}
    for dtype, systems in results["runs"].items():
        for name, record in systems.items():
            profile = record.pop("profile", None)
            if not profile:
                continue
            file = f"profile-{dtype}-{name.replace(' ', '-')}.txt"
            text = [f"## {stage}\n\n{p['table']}" for stage, p in profile.items()]
            (out_dir / file).write_text("\n".join(text))
            record["profile_top"] = {stage: p["top"] for stage, p in profile.items()}
            written[f"{name}, {dtype}"] = file
    return written
