"""The PNG plots of `fms-speech bench`: stage times, audio seconds per second, mixed workload.

matplotlib's object API (`Figure`), not pyplot: no global backend or figure state.
"""

from pathlib import Path

from matplotlib.figure import Figure

from fms_speech.bench.results import (
    STAGE_LABELS,
    STAGES,
    all_shapes,
    longest_smallest_batch,
    lookup,
    shapes_of,
    stage_stats,
)
from fms_speech.bench.settings import SYSTEMS, ClipShape

COLORS = {
    "reference eager": "#9e9e9e",
    "reference compiled": "#616161",
    "fms eager": "#64b5f6",
    "fms compiled": "#1565c0",
    "fms compiled cuda-graphs": "#2e7d32",
}


def plots(results: dict, out_dir: Path) -> list[str]:
    """Writes the plots that have data into `out_dir`; their file names."""
    written = []
    for draw, file in (
        (_plot_stages, "stages.png"),
        (_plot_rtf, "rtf.png"),
        (_plot_mixed, "mixed.png"),
    ):
        figure = draw(results)
        if figure is not None:
            figure.savefig(out_dir / file, dpi=110, bbox_inches="tight")
            written.append(file)
    return written


def _per_dtype_axes(runs: dict):
    figure = Figure(figsize=(6 * len(runs), 4))
    return figure, figure.subplots(1, len(runs), squeeze=False)[0]


def _plotted_shape(results: dict) -> ClipShape | None:
    """The longest clips at the smallest batch among the shapes that every system ran (the
    compiled ones run fewer batch sizes), else among all shapes."""
    ran = [
        {*shapes_of(record.get("e2e", {})), *shapes_of(record.get("modules", {}))}
        for systems in results["runs"].values()
        for record in systems.values()
    ]
    shapes = set.intersection(*ran) if ran else set()
    shapes = shapes or set(all_shapes(results))
    return longest_smallest_batch(list(shapes)) if shapes else None


def _plot_stages(results: dict) -> Figure | None:
    runs = results["runs"]
    shape = _plotted_shape(results)
    if shape is None:
        return None
    figure, axes = _per_dtype_axes(runs)
    for axis, (dtype, systems) in zip(axes, runs.items(), strict=True):
        names = [s for s in SYSTEMS if s in systems]
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            values = [(stage_stats(systems[name], shape, s) or {}).get("median", 0) for s in STAGES]
            positions = [x + i * width for x in range(len(STAGES))]
            axis.bar(positions, values, width, label=name, color=COLORS[name])
        axis.set_xticks([x + 0.4 - width / 2 for x in range(len(STAGES))])
        axis.set_xticklabels([STAGE_LABELS.get(s, s) for s in STAGES], rotation=20)
        axis.set_yscale("log")
        axis.set_ylabel("seconds (median)")
        axis.set_title(f"{shape.key}, {dtype}")
        axis.legend(fontsize=8)
    return figure


def _plot_rtf(results: dict) -> Figure | None:
    runs = results["runs"]
    figure, axes = _per_dtype_axes(runs)
    drawn = False
    for axis, (dtype, systems) in zip(axes, runs.items(), strict=True):
        for name in [s for s in SYSTEMS if s in systems]:
            e2e = systems[name].get("e2e", {})
            shapes = shapes_of(e2e)
            batches = sorted({s.batch for s in shapes})
            for batch in batches:
                points = sorted((s.seconds, e2e[s.key]["rtf"]) for s in shapes if s.batch == batch)
                axis.plot(
                    *zip(*points, strict=True),
                    "-" if batch == batches[-1] else ":",
                    marker="o",
                    color=COLORS[name],
                    label=f"{name}, batch {batch}",
                )
                drawn = True
        axis.set_xlabel("clip length (s)")
        axis.set_ylabel("audio seconds per second")
        axis.set_yscale("log")
        axis.set_title(f"end to end, {dtype}")
        if axis.has_data():
            axis.legend(fontsize=7)
    return figure if drawn else None


def _plot_mixed(results: dict) -> Figure | None:
    labels, steady, compile_time = [], [], []
    for dtype, systems in results["runs"].items():
        for name in SYSTEMS:
            mixed = lookup(systems, name, "mixed")
            if mixed:
                labels.append(f"{name}, {dtype}")
                steady.append(mixed["second_pass"])
                compile_time.append(mixed["first_pass"] - mixed["second_pass"])
        warm = lookup(results, "warm_cache", dtype)
        if warm and "first_pass" in warm:
            labels.append(f"fms compiled, {dtype}, warm cache")
            steady.append(warm["second_pass"])
            compile_time.append(warm["first_pass"] - warm["second_pass"])
        aot = lookup(results, "warm_cache", "aot", dtype)
        if aot and "first_pass" in aot:
            labels.append(f"fms precompiled, {dtype}, second process")
            steady.append(aot["second_pass"])
            compile_time.append(aot["load_seconds"] + aot["first_pass"] - aot["second_pass"])
    if not labels:
        return None
    figure = Figure(figsize=(8, 0.45 * len(labels) + 1))
    axis = figure.subplots()
    axis.barh(labels, steady, color="#1565c0", label="steady state (second pass)")
    axis.barh(
        labels,
        [max(0, c) for c in compile_time],
        left=steady,
        color="#ef6c00",
        label="first pass extra (compilation)",
    )
    axis.invert_yaxis()
    axis.set_xlabel("seconds for the mixed-length workload")
    axis.legend(fontsize=8)
    return figure
