"""Precompiled artifacts (fms_speech.aot): a second process compiles nothing, a key that differs
never reuses them, and calls they do not cover run just in time.

One small checkpoint (one layer of each part) is precompiled once per module by
`fms-speech compile` in its own process (real torch.export + AOTInductor: minutes on 2 cores).
Tolerance: the packages' logits against eager, max |x - y| / max |y| <= 1e-4 (fp32).
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import fms.models
import pytest
import torch
from fms.utils import generation as fms_generation

from fms_speech import Transcriber, aot
from fms_speech.generation import generate
from fms_speech.models.granite_speech import (
    GraniteSpeech,
    GraniteSpeechConfig,
    build_granite_speech_params,
)
from fms_speech.synthesis import synthesize, write_audio
from fms_speech.testing.reference import (
    make_reference,
    prompt_ids,
    reference_config,
    relative_error,
    save_reference,
    save_tokenizer,
)

TOLERANCE = 1e-4
MAX_NEW_TOKENS = 6
SMALL = dict(  # one layer of each part: the fewest kernels to compile
    encoder=dict(num_layers=1, context_size=12, conv_kernel_size=6),
    projector=dict(num_hidden_layers=1, cross_attention_frequency=1),
    text=dict(num_hidden_layers=1, tie_word_embeddings=False),
    window_size=12,
    downsample_rate=4,
)

# the second process: load with compile=True, transcribe, report what it compiled
SECOND_PROCESS = """
import json, sys
import torch
from torch._dynamo.utils import counters
from fms_speech import Transcriber
torch.set_num_threads(int(sys.argv[3]))
transcriber = Transcriber.from_pretrained(sys.argv[1], compile=True)
results = transcriber.transcribe(sys.argv[2].split(","), max_new_tokens=int(sys.argv[4]))
print(json.dumps({
    "runner": type(transcriber.runner).__name__,
    "calls": dict(getattr(transcriber.runner, "calls", {})),
    "dynamo_graphs": counters["stats"]["unique_graphs"],
    "dynamo_frames": counters["stats"]["calls_captured"],
    "texts": [result.text for result in results],
}))
"""


def _env(cache: Path) -> dict:
    return {**os.environ, "FMS_SPEECH_CACHE": str(cache), "PYTHONPATH": _pythonpath()}


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(checkpoint directory, cache directory, the thread count of the artifacts)."""
    root = tmp_path_factory.mktemp("aot")
    directory, cache = root / "model", root / "cache"
    save_reference(make_reference(reference_config(**SMALL), seed=3), directory)
    save_tokenizer(directory)
    threads = torch.get_num_threads()
    command = [sys.executable, "-m", "fms_speech.cli", "compile", "--model", str(directory)]
    run = subprocess.run(
        [*command, "--cache-dir", str(cache)], capture_output=True, text=True, env=_env(cache)
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("compiled into "), run.stdout
    return directory, cache, threads


@pytest.fixture
def model(prepared):
    directory, _, threads = prepared
    torch.set_num_threads(threads)  # part of the key: inductor writes it into its CPU kernels
    return fms.models.get_model("hf_pretrained", model_path=str(directory)).eval()


def _inputs(model, frames: list[int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(len(frames), max(frames), 160, generator=generator)
    lengths = torch.tensor(frames)
    counts = model.audio_token_counts(features, lengths).tolist()
    prompts = [prompt_ids(n, prefix=(5,) * (row + 1)) for row, n in enumerate(counts)]
    ids, padding = fms_generation.pad_input_ids([torch.tensor(p) for p in prompts])
    return ids, features, lengths, padding


def _prefill(runner, ids, features, lengths, padding):
    with torch.no_grad():
        return runner(
            ids,
            input_features=features,
            feature_lengths=lengths,
            use_cache=True,
            lora_gate=torch.ones(ids.shape[0]),
            last_n_tokens=1,
            **padding,
        )


@pytest.mark.slow
def test_second_process_compiles_nothing_and_writes_the_eager_text(prepared, tmp_path):
    directory, cache, threads = prepared
    files = []
    for index, text in enumerate(["hello world", "one two three four five six seven"]):
        samples, rate = synthesize(text)
        path = tmp_path / f"clip{index}.wav"
        write_audio(path, samples, rate, "wav")
        files.append(str(path))
    code = [sys.executable, "-c", SECOND_PROCESS, str(directory), ",".join(files)]
    run = subprocess.run(
        [*code, str(threads), str(MAX_NEW_TOKENS)], capture_output=True, text=True, env=_env(cache)
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["runner"] == "PrecompiledModel"
    assert report["dynamo_graphs"] == 0 and report["dynamo_frames"] == 0
    assert report["calls"].get("jit", 0) == 0
    assert report["calls"]["prefill"] == 1 and report["calls"]["decode"] >= 1
    eager = Transcriber.from_pretrained(directory).transcribe(files, max_new_tokens=MAX_NEW_TOKENS)
    assert report["texts"] == [result.text for result in eager]


@pytest.mark.slow
def test_weights_are_read_at_load_not_compiled_in(prepared, model):
    _, cache, _ = prepared
    other = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    runner = aot.load(other, cache)
    assert runner is not None, "the same config, dtype and device: the same artifacts"
    inputs = _inputs(model, [40, 17])
    logits, cache_tensors = _prefill(runner, *inputs)
    expected, expected_cache = _prefill(other, *inputs)
    assert relative_error(logits, expected) <= TOLERANCE
    assert relative_error(cache_tensors[0][0], expected_cache[0][0]) <= TOLERANCE
    original, _ = _prefill(model, *inputs)
    assert relative_error(original, expected) > 1e-2  # the weights differ, and so do logits
    assert runner.calls == {"prefill": 1}


@pytest.mark.slow
def test_packages_generate_the_eager_tokens_for_one_clip_and_several(prepared, model):
    """The packages were exported from a batch of 2: batch 1 (a size the compiled code must not
    have assumed away) and 3 give eager's greedy tokens, through prefill and decode packages."""
    _, cache, _ = prepared
    runner = aot.load(model, cache)
    for frames in ([23], [5, 60, 33]):
        ids, features, lengths, _ = _inputs(model, frames, seed=len(frames))
        prompts = [row[row != 0].tolist() for row in ids]  # pad_input_ids pads with 0
        kwargs = dict(max_new_tokens=MAX_NEW_TOKENS, eos_token_id=-1, pad_token_id=0)
        expected = generate(model, prompts, features, lengths, **kwargs)
        actual = generate(runner, prompts, features, lengths, **kwargs)
        assert actual.sequences == expected.sequences, frames
        logits, _ = _prefill(runner, *_inputs(model, frames, seed=len(frames)))
        eager, _ = _prefill(model, *_inputs(model, frames, seed=len(frames)))
        assert relative_error(logits, eager) <= TOLERANCE
    assert runner.calls == {"prefill": 4, "decode": 2 * (MAX_NEW_TOKENS - 1)}


@pytest.mark.slow
def test_calls_the_packages_do_not_cover_run_just_in_time(prepared, model, monkeypatch):
    _, cache, _ = prepared
    runner = aot.load(model, cache)
    # the JIT path's compile, cut to dynamo's tracing: this test is about which path runs
    monkeypatch.setattr(aot, "compile_model", lambda m: torch.compile(m, backend="eager"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        text_only = runner(ids, use_cache=True, last_n_tokens=1)[0]  # no audio: no package
        expected = model(ids, use_cache=True, last_n_tokens=1)[0]
    assert relative_error(text_only, expected) <= TOLERANCE
    ids, features, lengths, padding = _inputs(model, [1])  # one frame: below the packages' range
    logits, _ = _prefill(runner, ids, features, lengths, padding)
    assert relative_error(logits, _prefill(model, ids, features, lengths, padding)[0]) <= TOLERANCE
    assert runner.calls == {"jit": 2}


@pytest.mark.slow
def test_artifacts_of_another_key_are_never_used(prepared, model, tmp_path, caplog):
    directory, cache, _ = prepared
    assert aot.load(model.to(torch.bfloat16), cache) is None  # another dtype: no artifacts
    model.to(torch.float32)
    assert aot.load(model, cache) is not None
    # a directory whose key is not this model's: refused with a warning
    copied = tmp_path / "cache"
    source = aot.artifact_dir(model, cache)
    target = aot.artifact_dir(model, copied)
    target.parent.mkdir(parents=True)
    target.symlink_to(source, target_is_directory=True)
    stored = json.loads((source / aot.KEY_FILE).read_text())
    assert stored == aot.artifact_key(model)
    tampered = tmp_path / "tampered"
    tampered_dir = aot.artifact_dir(model, tampered)
    tampered_dir.mkdir(parents=True)
    for file in source.iterdir():
        (tampered_dir / file.name).symlink_to(file)
    (tampered_dir / aot.KEY_FILE).unlink()
    (tampered_dir / aot.KEY_FILE).write_text(json.dumps({**stored, "torch": "0.0"}))
    assert aot.load(model, tampered) is None
    assert "holds artifacts of another model or setup" in caplog.text
    # an unreadable package: a warning and the JIT path, never a crash
    broken = tmp_path / "broken"
    broken_dir = aot.artifact_dir(model, broken)
    broken_dir.mkdir(parents=True)
    for file in source.iterdir():
        (broken_dir / file.name).symlink_to(file)
    (broken_dir / "prefill.pt2").unlink()
    (broken_dir / "prefill.pt2").write_bytes(b"not a package")
    caplog.clear()
    assert aot.load(model, broken) is None
    assert "cannot load the precompiled artifacts" in caplog.text
    assert type(aot.compiled_runner(model, broken)).__name__ == "OptimizedModule"
    assert aot.load(model, copied) is not None  # the same key elsewhere: used


def _small_model(**encoder) -> torch.nn.Module:
    config = reference_config(**{**SMALL, "encoder": {**SMALL["encoder"], **encoder}})
    return GraniteSpeech(GraniteSpeechConfig(**build_granite_speech_params(config))).eval()


def test_the_key_holds_what_decides_the_compiled_code(monkeypatch, tmp_path):
    model = _small_model()
    base = aot.artifact_dir(model, tmp_path)
    assert aot.artifact_dir(_small_model(), tmp_path) == base  # weights are not in the key
    changed = {
        "dtype": aot.artifact_dir(copy.deepcopy(model).to(torch.bfloat16), tmp_path),
        "config": aot.artifact_dir(_small_model(num_layers=2), tmp_path),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        changed["threads"] = aot.artifact_dir(model, tmp_path)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    changed["torch"] = aot.artifact_dir(model, tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(aot, "_source_digest", lambda: "other model code")
    changed["source"] = aot.artifact_dir(model, tmp_path)
    assert len({base, *changed.values()}) == 1 + len(changed), changed
    key = aot.artifact_key(model)
    assert key["device"] == "cpu" and key["device_kind"].endswith(
        torch.backends.cpu.get_cpu_capability()
    )


def test_compile_of_a_bad_directory_is_one_line_and_exit_2(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "fms_speech.cli", "compile", "--model", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": _pythonpath()},
    )
    assert run.returncode == 2
    assert run.stderr.startswith("fms-speech: error: ") and run.stderr.count("\n") == 1
    assert not any(tmp_path.iterdir())
