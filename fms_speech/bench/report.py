"""What `fms-speech bench` writes: the printed table, bench.json, bench.md, profiles, plots.

    python -m fms_speech.bench.report PARTIAL_JSON OUTPUT_DIR

writes the report of a run stopped before its end from the bench-partial.json it left.
"""

import json
import sys
from pathlib import Path

from fms_speech.bench.markdown import markdown, write_profiles
from fms_speech.bench.plots import plots
from fms_speech.bench.results import agreement, all_shapes, format_seconds, lookup
from fms_speech.bench.settings import SYSTEMS
from fms_speech.bench.targets import targets


def summary_table(results: dict) -> str:
    """End-to-end median per shape (and real-time factor) for every system and dtype."""
    lines = []
    for dtype, systems in results["runs"].items():
        names = [s for s in SYSTEMS if s in systems]
        lines.append(f"{dtype}: end to end, median (audio seconds per second)")
        lines.append("  " + f"{'shape':<10}" + "".join(f"{n:>24}" for n in names))
        for shape in all_shapes(results):
            cells = []
            for name in names:
                e2e = lookup(systems[name], "e2e", shape.key)
                median = e2e and e2e["end_to_end"]["median"]
                cell = f"{format_seconds(median)} ({e2e['rtf']:.3g})" if e2e else "-"
                cells.append(f"{cell:>24}")
            lines.append("  " + f"{shape.key:<10}" + "".join(cells))
    lines.append("targets:")
    for row in results["targets"]:
        lines.append(f"  [{row['status']}] {row['target']} ({row['goal']}): {row['value']}")
    return "\n".join(lines)


def write_all(results: dict, out_dir: Path) -> None:
    """Completes `results` (agreement, targets, plots) and writes every output to `out_dir`."""
    results["agreement"] = agreement(results)
    results["targets"] = targets(results)
    results["plots"] = plots(results, out_dir)
    profiles = write_profiles(results, out_dir)
    (out_dir / "bench.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "bench.md").write_text(markdown(results, profiles))
    print(summary_table(results))
    print(
        f"wrote {out_dir / 'bench.json'}, {out_dir / 'bench.md'} and {len(results['plots'])} plots"
    )


def main(argv: list[str]) -> int:
    partial, out_dir = Path(argv[0]), Path(argv[1])
    results = json.loads(partial.read_text())
    results["meta"].setdefault("command", "(stopped before its end: the systems it measured)")
    write_all(results, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
