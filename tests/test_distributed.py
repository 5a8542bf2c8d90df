"""Tensor parallelism and data parallelism under torchrun: 2 processes, gloo, 127.0.0.1.

Each torchrun worker runs tests/torchrun_worker.py, which records its pid: every process a test
starts is stopped by pid (and torchrun by its process group) when the test ends, passed or not.
One launch checks the model (eager and compiled logits, graphs, generation in lockstep), one the
CLI in both modes; the fault tests end within their --timeout-seconds.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fms.models
import pytest
import torch
from torch._dynamo.utils import counters
from torchrun_worker import LEAVING_RANK, PORTS, forward_cases, generation_batches, make_inputs

from fms_speech.cli import main
from fms_speech.compile import compile_model
from fms_speech.distributed import GenerationBatch
from fms_speech.synthesis import synthesize, write_audio
from fms_speech.testing.reference import (
    make_reference,
    reference_config,
    relative_error,
    save_reference,
)
from fms_speech.transcribe import Transcriber

WORKER = Path(__file__).with_name("torchrun_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
LAUNCH_SECONDS = 600  # a bound on a whole launch (loading, compiling) on a loaded 2-core CPU
TOLERANCE = 1e-5  # fp32: max |tensor parallel - one process| / max |one process|
# the CLI runs: kv heads 1 (replicated over the ranks), untied LM head
CLI_ARGS = ["--max-new-tokens", "6", "--batch-size", "2", "--output-format", "json"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(pid: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)


@contextlib.contextmanager
def _launched(run_dir: Path, *worker_args, env: dict | None = None):
    """torchrun (2 processes) of the worker; every process it started is killed on exit."""
    command = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    command += ["--master-port", str(_free_port()), str(WORKER), str(run_dir), *worker_args]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # its own process group, for the kill below
    )
    try:
        yield process
    finally:
        for pid_file in run_dir.glob("rank*.pid"):  # workers run in sessions of their own
            _stop(int(pid_file.read_text()))
        _stop(process.pid, group=True)
        process.wait()


def _finish(process, timeout: float = LAUNCH_SECONDS) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def _exit_codes(run_dir: Path) -> dict[int, list[int]]:
    return {r: json.loads((run_dir / f"rank{r}.exit").read_text()) for r in range(2)}


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("fms-speech:")]


# ---- the model: logits, graphs and generation, one process against two ranks


@pytest.fixture(scope="module")
def one_layer_checkpoint(tmp_path_factory):
    """A reference-saved checkpoint with one layer in each part: the cheapest to compile."""
    config = reference_config(
        encoder={"num_layers": 1},
        projector={"num_hidden_layers": 1, "cross_attention_frequency": 1},
        text={"num_hidden_layers": 1},
    )
    directory = save_reference(make_reference(config, seed=3), tmp_path_factory.mktemp("one"))
    return fms.models.get_model("hf_pretrained", model_path=str(directory)).eval(), directory


@pytest.mark.slow
def test_tensor_parallel_equals_one_process(checkpoints, one_layer_checkpoint, tmp_path):
    """TP over 2 ranks against one process, fp32, to TOLERANCE: KV heads split (2 over 2 ranks,
    eager and compiled) and replicated (1 for 2 ranks, untied head); the LoRA on, off and mixed
    per row; two batch sizes, a decode step, text only; generation led by rank 0 (Lockstep).

    The compiled ranks (inductor, fullgraph, dynamic) are held to the one-process eager logits,
    and their graph count to the one-process count taken with dynamo's eager backend: dynamo
    captures the same graphs whatever the backend, and inductor can only add recompilations, so
    this bound is at least as strict as one-process inductor's and costs no inductor compile.
    """
    _, untied, untied_dir = checkpoints["untied_window12"]
    models = {"split_kv": one_layer_checkpoint[0], "replicated_kv": untied}
    directories = {"split_kv": one_layer_checkpoint[1], "replicated_kv": untied_dir}
    saved = {"compiled": "split_kv", "generated": "replicated_kv"}
    saved["checkpoints"] = {key: str(directory) for key, directory in directories.items()}
    saved["cases"] = {key: make_inputs(model, seed=len(key)) for key, model in models.items()}
    saved["generations"] = generation_batches(saved["cases"]["replicated_kv"], eos=1, pad=2)
    torch.save(saved, tmp_path / "inputs.pt")

    with _launched(tmp_path, "tensor-parallel", str(tmp_path / "inputs.pt")) as process:
        # the one-process side runs while the ranks load and compile
        expected = {key: forward_cases(models[key], saved["cases"][key]) for key in models}
        torch._dynamo.reset()
        before = counters["stats"]["unique_graphs"]
        cases = saved["cases"]["split_kv"]
        forward_cases(compile_model(models["split_kv"], backend="eager"), cases, compiled=True)
        single_graphs = counters["stats"]["unique_graphs"] - before
        torch._dynamo.reset()
        sequences = [
            GenerationBatch(**inputs, settings=settings).generate(untied).sequences
            for inputs, settings in saved["generations"]
        ]
        code, _, err = _finish(process)
    assert code == 0, err[-3000:]

    for key, logits in expected.items():  # the LoRA changes the logits: a dropped one shows
        assert relative_error(logits["audio-lora-on"], logits["audio-lora-off"]) > 1e-2, key
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for key, model in models.items():
            local_heads = model.config.text_config.nheads // 2
            assert result["local_heads"][key] == ("LoRATPMultiHeadAttention", local_heads)
            assert result["eager"][key].keys() == expected[key].keys()
            for case, logits in expected[key].items():
                error = relative_error(result["eager"][key][case], logits)
                assert error <= TOLERANCE, (rank, key, case, error)
        assert result["compiled"].keys() == {c["name"] for c in cases if "eager_only" not in c}
        for case, logits in result["compiled"].items():
            error = relative_error(logits, expected["split_kv"][case])
            assert error <= TOLERANCE, (rank, "compiled", case, error)
        assert 1 <= result["graphs"] <= single_graphs, (result["graphs"], single_graphs)
        assert "3 query heads do not split evenly over 2 ranks" in result["head_error"]
    leader, follower = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert leader["sequences"] == sequences
    assert len({tuple(row) for batch in sequences for row in batch}) > 1  # not one echo
    assert follower["followed"] == len(sequences)


# ---- the CLI: the same texts as one process, in both modes


@pytest.fixture(scope="module")
def spoken_files(tmp_path_factory):
    """Three spoken sentences and, third, a file that is not audio."""
    directory = tmp_path_factory.mktemp("spoken")
    files = []
    spoken = [("hello.wav", "hello world"), ("numbers.wav", "one two three four five")]
    spoken += [(None, None), ("fox.mp3", "the quick brown fox")]
    for name, text in spoken:
        if name is None:
            files.append(directory / "notes.wav")
            files[-1].write_text("meeting notes, not audio\n")
            continue
        samples, sample_rate = synthesize(text)
        files.append(directory / name)
        write_audio(files[-1], samples, sample_rate, files[-1].suffix[1:])
    return files


def _texts(directory: Path) -> dict[str, str]:
    return {p.stem: json.loads(p.read_text())["text"] for p in sorted(directory.glob("*.json"))}


def test_transcribe_under_torchrun(speech_checkpoint, spoken_files, tmp_path, capsys):
    _, model_dir = speech_checkpoint
    files = [str(f) for f in spoken_files]
    common = ["transcribe", *files, "--model", str(model_dir), *CLI_ARGS]
    assert main([*common, "--output-dir", str(tmp_path / "one")]) == 1  # notes.wav fails
    capsys.readouterr()
    expected = _texts(tmp_path / "one")
    assert sorted(expected) == ["fox", "hello", "numbers"]
    assert len(set(expected.values())) == 3  # texts that could be mixed up

    runs = tmp_path / "runs"
    runs.mkdir()
    tp = [*common, "--output-dir", str(tmp_path / "tp")]  # the default under torchrun
    data = [*common, "--parallel", "data", "--output-dir", str(tmp_path / "data")]
    data_stdout = [*common, "--output-format", "txt", "--parallel", "data"]  # stdout: txt
    ports = {PORTS: f"{_free_port()},{_free_port()}"}
    with _launched(runs, "cli", *tp, "---", *data, "---", *data_stdout, env=ports) as process:
        code, out, err = _finish(process)
    assert code != 0  # torchrun reports rank 0's exit code 1 as a failure
    assert _exit_codes(runs) == {0: [1, 1, 1], 1: [0, 0, 0]}, err[-3000:]
    assert _texts(tmp_path / "tp") == expected
    assert _texts(tmp_path / "data") == expected
    # data-parallel stdout: every input once, in the inputs' order, gathered on rank 0
    assert out.splitlines() == [f"{f}\t{expected[Path(f).stem]}" for f in files if "notes" not in f]
    errors = _errors(err)
    assert sum("notes.wav" in line for line in errors) == 3, errors  # once per run
    assert errors.count("fms-speech: 3 of 4 inputs transcribed by 2 ranks") == 2, errors
    assert "]: Traceback" not in err  # a worker's uncaught error, as torchrun shows it


# ---- faults: a clear line and a non-zero exit within the timeout, never a hang


def test_a_rank_that_leaves_early_ends_the_run(speech_checkpoint, spoken_files, tmp_path):
    _, model_dir = speech_checkpoint
    command = ["transcribe", str(spoken_files[0]), "--model", str(model_dir), *CLI_ARGS]
    started = time.monotonic()
    env = {LEAVING_RANK: "1"}
    with _launched(tmp_path, "cli", *command, "--timeout-seconds", "20", env=env) as process:
        code, _, err = _finish(process)
    assert code != 0
    assert _exit_codes(tmp_path) == {0: [2], 1: [0]}
    errors = _errors(err)
    assert len(errors) == 1 and errors[0].startswith(
        "fms-speech: error: rank 0: lost contact with the other ranks while"
    ), err[-3000:]
    assert time.monotonic() - started < LAUNCH_SECONDS


def test_a_rank_that_never_joins_ends_the_run(speech_checkpoint, spoken_files):
    """Rank 0 of 2 started alone (as on a node whose peer never starts), no torchrun."""
    _, model_dir = speech_checkpoint
    command = [sys.executable, "-m", "fms_speech.cli", "transcribe", str(spoken_files[0])]
    command += ["--model", str(model_dir), "--timeout-seconds", "5"]
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env={**os.environ, **env}
    )
    try:
        _, err = process.communicate(timeout=LAUNCH_SECONDS)
    finally:
        _stop(process.pid)
        process.wait()
    assert process.returncode == 2
    errors = _errors(err)
    assert len(errors) == 1 and errors[0].startswith(
        "fms-speech: error: rank 0: lost contact with the other ranks while joining the process "
        "group (a rank failed, exited or did not answer within 5 s): DistStoreError"
    ), err


# ---- errors before anything is loaded, in this process


def test_parallel_needs_torchrun(speech_checkpoint, spoken_files, capsys):
    _, model_dir = speech_checkpoint
    code = main(["transcribe", str(spoken_files[0]), "--model", str(model_dir), "--parallel", "tp"])
    assert code == 2
    assert capsys.readouterr().err == (
        "fms-speech: error: --parallel tp needs a torchrun launch (WORLD_SIZE is not set)\n"
    )


@pytest.mark.parametrize("parallel", ["tp", "data"])
def test_transcriber_parallel_needs_a_process_group(speech_checkpoint, parallel):
    _, model_dir = speech_checkpoint
    with pytest.raises(ValueError, match=f"parallel='{parallel}' needs a process group"):
        Transcriber.from_pretrained(model_dir, parallel=parallel)
