"""scripts/gpu_check.sh, dry-run on the CPU (`--device cpu --smoke`) so that it cannot rot before
a GPU runs it: every step runs (dependencies, the device tests, the bench) and writes its
report; the GPU-only parts (the 3.3-2b shapes, CUDA graphs) are what --smoke leaves out."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """scripts/gpu_check.sh ARGS as the device tool runs it ($OUT set); (the run, $OUT)."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    script = str(ROOT / "scripts" / "gpu_check.sh")
    # cwd elsewhere: the script finds the repository itself
    run = subprocess.run(
        ["bash", script, *args], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    return run, out


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    run, out = _check(tmp_path, "--device", "cpu", "--smoke")
    summary = (out / "summary.txt").read_text()
    assert run.returncode == 0, summary + (out / "check.log").read_text()[-3000:]
    assert "device: cpu" in summary
    assert "tests on cpu: exit 0" in summary and "bench: exit 0" in summary
    log = (out / "check.log").read_text()
    assert " passed" in log and " failed" not in log
    report = (out / "bench.md").read_text()
    assert "## Targets" in report and "fms compiled" in report
    assert (out / "bench.json").is_file()
    assert not (out / "bench-partial.json").exists()
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back from $OUT


def test_no_tests_leaves_the_device_tests_out(tmp_path):
    """--no-tests: the bench alone (here with no time left for it: the bench is skipped too)."""
    run, out = _check(tmp_path, "--device", "cpu", "--smoke", "--no-tests", "--budget", "0")
    summary = (out / "summary.txt").read_text()
    assert "tests on cpu: left out (--no-tests)" in summary
    assert "bench: skipped" in summary and run.returncode == 1  # nothing measured: a failure
    assert "pytest" not in (out / "check.log").read_text()


def test_wheels_list_and_fetch_script_agree():
    """The pinned wheels are the modules the script checks for, and the fetch script reads them."""
    listed = [
        line.split("==")[0]
        for line in (ROOT / "scripts" / "gpu-wheels.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    # transformers: the version CI tests the reference with (the GPU image's saves elsewhere)
    assert set(listed) == {
        "ibm-fms",
        "soxr",
        "soundfile",
        "cffi",
        "pycparser",
        "espeakng-loader",
        "transformers",
    }
    fetch = (ROOT / "scripts" / "fetch_gpu_wheels.sh").read_text()
    assert "-r gpu-wheels.txt" in fetch and "--python-version" in fetch
    check = (ROOT / "scripts" / "gpu_check.sh").read_text()
    for module in ("fms", "soxr", "soundfile", "espeakng_loader", "cffi"):
        assert f'"{module}"' in check


def test_systems_replaces_the_benchs_systems(tmp_path):
    """--systems: the bench measures those systems alone (here fms eager on the --quick model)."""
    run, out = _check(
        tmp_path, "--device", "cpu", "--smoke", "--no-tests", "--systems", "fms-eager"
    )
    summary = (out / "summary.txt").read_text()
    assert run.returncode == 0, summary + (out / "check.log").read_text()[-3000:]
    report = (out / "bench.md").read_text()
    (systems,) = [line for line in report.splitlines() if line.startswith("- systems: ")]
    # without --systems the smoke bench measures reference eager, fms eager and fms compiled
    assert systems.startswith("- systems: fms eager ("), systems
