"""`fms-speech bench --quick`: every output is written and holds the expected structure."""

import argparse
import json
import subprocess
import sys

import pytest

from fms_speech.bench import cli
from fms_speech.bench.settings import GRID_WIDTHS, SYSTEMS, ClipShape

# --quick on the CPU: every system but the CUDA-graphs one
CPU_SYSTEMS = [name for name in SYSTEMS if not name.endswith("cuda-graphs")]

STAGES = ("features", "prefill", "decode", "end_to_end")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert cli.main(["--quick", "--output-dir", str(out)]) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_every_system_measured_every_stage(quick_run):
    _, results = quick_run
    runs = results["runs"]["float32"]
    assert set(runs) == set(CPU_SYSTEMS)
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
    assert len(results["agreement"]["compared"]) == len(CPU_SYSTEMS)
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


def test_report_of_a_run_stopped_from_outside(quick_run, tmp_path):
    """gpu_check.sh writes the report from bench-partial.json when its time limit stops the bench:
    the file has the run's start (load, systems, command) but no end."""
    out, _ = quick_run
    partial = json.loads((out / "bench-partial.json").read_text())
    assert "load_average_start" in partial["meta"] and "command" in partial["meta"]
    assert "wall_seconds" not in partial["meta"]
    partial["runs"]["float32"] = {"fms eager": partial["runs"]["float32"]["fms eager"]}
    (tmp_path / "bench-partial.json").write_text(json.dumps(partial))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fms_speech.bench.report",
            str(tmp_path / "bench-partial.json"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "bench.md").read_text()
    assert "run time ? (stopped before its end)" in report and "| fms eager |" in report


def test_shape_keys_of_the_report_are_clip_shapes(quick_run):
    _, results = quick_run
    settings = results["meta"]["settings"]
    keys = set(results["runs"]["float32"]["fms eager"]["e2e"])
    expected = {ClipShape(s, b) for s in settings["lengths"] for b in settings["batch_sizes"]}
    assert {ClipShape.from_key(key) for key in keys} == expected


@pytest.mark.parametrize(
    "shape", [ClipShape(10.0, 4), ClipShape(2.5, 1), ClipShape(0.25, 16), ClipShape(30.0, 1)]
)
def test_clip_shape_key_round_trip(shape):
    assert ClipShape.from_key(shape.key) == shape
    assert ClipShape.from_key(shape.key.replace(" ", "")) == shape


def test_clip_shape_key_is_the_reports_name():
    assert ClipShape(10.0, 4).key == "10s x4"
    assert ClipShape(2.5, 1).key == "2.5s x1"


@pytest.mark.parametrize("key", ["10s", "x4", "10 x4", "10s x", "-1s x4", "10s x4.5", ""])
def test_clip_shape_rejects_other_text(key):
    with pytest.raises(ValueError, match="not a clip shape"):
        ClipShape.from_key(key)


HEAVY = (
    "matplotlib",
    "peft",
    "fms_speech.bench.run",
    "fms_speech.bench.systems",
    "fms_speech.testing.reference",
    "transformers.models.granite_speech.modeling_granite_speech",
)


def test_bench_options_load_no_bench_machinery():
    """`fms-speech bench --help` (and so every command's parser) loads neither the bench's
    measuring code nor transformers' Granite Speech model nor matplotlib."""
    code = (
        "import sys\n"
        "from fms_speech import cli\n"
        "try:\n"
        "    cli.main(['bench', '--help'])\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0\n"
        f"print('loaded:', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--quick" in run.stdout
    assert run.stdout.splitlines()[-1] == "loaded: []"


def test_missing_bench_dependency_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(cli.BENCH_DEPENDENCIES, "no_such_module_of_the_bench", "no-such-package")
    assert cli.main(["--quick", "--output-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error == (
        "fms-speech bench: error: the bench needs no-such-package: pip install no-such-package\n"
    )
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--variant", "9.9-9b"], "unknown --variant '9.9-9b' (one of "),
        (["--model", "no/such/dir"], "--model no/such/dir is not a checkpoint directory"),
    ],
)
def test_bad_source_is_one_line_and_exit_2(arguments, message, capsys, tmp_path):
    assert cli.main([*arguments, "--output-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"fms-speech bench: error: {message}")
    assert error.count("\n") == 1
    assert not any(tmp_path.iterdir())


# ---- a CTC checkpoint (granite_speech5): its own stages


@pytest.fixture(scope="module")
def ctc_quick_run(ctc_checkpoints, tmp_path_factory):
    _, _, directory = ctc_checkpoints["ctc_tiny"]
    out = tmp_path_factory.mktemp("bench_ctc")
    assert cli.main(["--model", str(directory), "--quick", "--output-dir", str(out)]) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_ctc_bench_measures_every_system_and_stage(ctc_quick_run):
    out, results = ctc_quick_run
    runs = results["runs"]["float32"]
    assert list(runs) == ["reference eager", "fms eager", "fms compiled"]
    for system, record in runs.items():
        assert record["e2e"], system
        for shape, entry in record["e2e"].items():
            ClipShape.from_key(shape)
            for stage in ("features", "encoder", "decode", "end_to_end"):
                stats = entry[stage]
                assert 0 < stats["min"] <= stats["median"] <= stats["max"], (system, shape, stage)
            assert entry["rtf"] == pytest.approx(
                entry["audio_seconds"] / entry["end_to_end"]["median"]
            )
    assert results["agreement"]["float32"] is True  # the same texts from every system
    assert runs["fms compiled"]["compiles"]["graph_breaks"] == 0
    assert results["explain"] == {"graphs": 1, "graph_breaks": 0}
    report = (out / "bench.md").read_text()
    assert "| shape | system | features | encoder | decode |" in report
    assert "load average" in report


def test_ctc_bench_refuses_the_compiled_reference(ctc_checkpoints, capsys, tmp_path):
    _, _, directory = ctc_checkpoints["ctc_tiny"]
    arguments = ["--model", str(directory), "--systems", "ref-compiled", "--output-dir"]
    assert cli.main([*arguments, str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("fms-speech bench: error: a CTC model is benched as reference eager")
    assert not any(tmp_path.iterdir())


def test_grid_widths_option_names_the_grids_widths():
    """--grid-widths' choices (settings, read without torch) are DEFAULT_GRID's hidden sizes."""
    from fms_speech.bench.grid import DEFAULT_GRID

    assert tuple(width.hidden for width in DEFAULT_GRID) == GRID_WIDTHS
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert parser.parse_args(["--grid-widths", "256", "512"]).grid_widths == [256, 512]
    with pytest.raises(SystemExit):
        parser.parse_args(["--grid-widths", "384"])
