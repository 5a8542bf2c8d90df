"""`fms-speech bench --quick`: every output is written and holds the expected structure."""

import json

import pytest

from fms_speech import bench
from fms_speech.bench_models import SYSTEMS

STAGES = ("features", "prefill", "decode", "end_to_end")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--quick", "--output-dir", str(out)]) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_every_system_measured_every_stage(quick_run):
    _, results = quick_run
    runs = results["runs"]["float32"]
    assert set(runs) == set(SYSTEMS)
    for system, record in runs.items():
        for shape, e2e in record["e2e"].items():
            for stage in STAGES:
                stats = e2e[stage]
                assert 0 < stats["min"] <= stats["median"] <= stats["max"], (system, shape, stage)
            assert e2e["decode_steps"] == results["meta"]["settings"]["max_new_tokens"] - 1
        for modules in record["modules"].values():
            assert modules["encoder"]["median"] > 0 and modules["projector"]["median"] > 0
        assert record["mixed"]["second_pass"] > 0


def test_tokens_agree_and_compilations_are_counted(quick_run):
    _, results = quick_run
    assert results["agreement"]["tokens_agree"] is True
    assert len(results["agreement"]["compared"]) == len(SYSTEMS)
    runs = results["runs"]["float32"]
    assert runs["fms eager"]["compiles"]["graphs"] == 0
    assert runs["fms compiled"]["compiles"]["graph_breaks"] == 0
    assert runs["reference compiled"]["compiles"]["graph_breaks"] > 0
    assert results["explain"]["fms"] == {"graphs": 1, "graph_breaks": 0, "break_reasons": []}


def test_report_files(quick_run):
    out, results = quick_run
    statuses = {target["status"] for target in results["targets"]}
    assert statuses <= {"hit", "miss", "not measured"}
    report = (out / "bench.md").read_text()
    for section in ("## Targets", "## Agreement", "## Stages, float32", "## Mixed-length"):
        assert section in report
    assert results["plots"]
    for plot in results["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot})" in report
