"""Load benchmark of `fms-speech serve`: N concurrent clients, one request at a time vs batched.

    fms-speech bench serve [--model DIR] [--clients 1 4 8 16] [--compile]

Starts two real servers (subprocesses on 127.0.0.1) on the same checkpoint: one taking one
request at a time (`--max-batch 1`), one batching (`--max-batch 16`). For each client count,
that many threads each send requests back to back with the official openai client (closed loop,
`--requests` each, after one untimed round), every client its own order of the clips; the two
servers are measured one right after the other. Reported:
throughput in audio seconds per second of wall time, p50/p95 latency, and the model calls'
batch sizes from the server's /metrics; as a table on stdout and JSON (`--output`).

Without `--model` it builds the benchmark's embedded default (random weights saved by the
reference, fms_speech.bench_models) with a small word-level tokenizer and chat template, and
speaks its clips with eSpeak NG. Random weights never write eos, so every window decodes exactly
--max-new-tokens tokens: the same work per request in both modes.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import soundfile
import torch

from fms_speech.audio import SAMPLE_RATE
from fms_speech.prompts import CHAT_TEMPLATE
from fms_speech.serve.process import ServerProcess

SPECIAL_TOKENS = ("<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|unk|>")
PROMPT_WORDS = "user assistant can you transcribe the speech into a written format ?"


def save_chat_tokenizer(directory: Path, vocab_size: int, audio_token: int, eos_token: int):
    """A word-level tokenizer with a Granite-style chat template for a random-weight checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    free = (i for i in range(vocab_size) if i not in (audio_token, eos_token))
    vocab = {SPECIAL_TOKENS[0]: eos_token, "<|audio|>": audio_token}
    vocab |= {token: next(free) for token in SPECIAL_TOKENS[1:]}
    vocab |= {word: next(free) for word in dict.fromkeys(PROMPT_WORDS.split())}
    vocab |= {f"w{token_id}": token_id for token_id in free}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[0],
        unk_token="<|unk|>",
        additional_special_tokens=["<|start_of_role|>", "<|end_of_role|>", "<|audio|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)


def build_default_checkpoint(directory: Path) -> Path:
    """The bench's embedded default (fms_speech.bench.checkpoints), with a chat tokenizer."""
    from fms_speech.bench.checkpoints import EMBEDDED_LORA, build_checkpoint, embedded_config

    config = embedded_config()
    build_checkpoint(config, directory, torch.float32, EMBEDDED_LORA)
    text = config.text_config
    save_chat_tokenizer(directory, text.vocab_size, config.audio_token_index, text.eos_token_id)
    return directory


def make_clips(directory: Path, count: int, seconds: float) -> list[tuple[Path, float]]:
    """`count` different clips of about `seconds` of eSpeak NG speech, as 16 kHz WAV files."""
    from fms_speech.bench.inputs import speech_clip

    clips = []
    for index in range(count):
        length = seconds * (0.75 + 0.5 * index / max(count - 1, 1))  # 0.75x to 1.25x
        samples = speech_clip(length, seed=index).numpy()
        path = directory / f"clip{index:02d}.wav"
        soundfile.write(path, samples, SAMPLE_RATE, subtype="PCM_16")
        clips.append((path, len(samples) / SAMPLE_RATE))
    return clips


def run_clients(server: ServerProcess, clips, clients: int, requests: int) -> dict:
    """`clients` threads, each sending `requests` requests back to back; latency and throughput."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    latencies: list[float] = []
    audio_seconds = [0.0]
    failures: list[str] = []
    lock = threading.Lock()
    start_together = threading.Barrier(clients)

    def work(offset: int) -> None:
        start_together.wait()
        for index in range(requests):
            path, seconds = clips[(offset * 7 + index) % len(clips)]
            started = time.perf_counter()
            try:
                client.audio.transcriptions.create(file=path, model=server.model)
            except Exception as error:  # counted and reported: the benchmark goes on
                with lock:
                    failures.append(f"{type(error).__name__}: {error}")
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                audio_seconds[0] += seconds

    before = server.metrics()
    threads = [
        threading.Thread(target=work, args=(offset,), daemon=True) for offset in range(clients)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # a timeout keeps Ctrl-C working
            thread.join(timeout=0.5)
    wall = time.perf_counter() - started
    after = server.metrics()
    return {
        "clients": clients,
        "requests": len(latencies),
        "failures": failures,
        "wall_seconds": wall,
        "audio_seconds": audio_seconds[0],
        "throughput": audio_seconds[0] / wall,
        "p50_seconds": _percentile(latencies, 50),
        "p95_seconds": _percentile(latencies, 95),
        "batches": _batches(before, after),
    }


def _percentile(values: list[float], percent: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


def _batches(before: dict, after: dict) -> dict:
    """Model calls between two /metrics readings: count, mean and largest windows per call."""

    def change(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    count = change("fms_speech_batch_windows_count")
    buckets = sorted(
        (float(name.split('le="')[1].rstrip('"}')), change(name))
        for name in after
        if name.startswith("fms_speech_batch_windows_bucket") and "+Inf" not in name
    )
    largest = next((bound for bound, below in buckets if below == count), None)
    return {
        "calls": int(count),
        "mean_windows": change("fms_speech_batch_windows_sum") / count if count else 0.0,
        "largest_at_most": largest,
    }


def measure(args, model_dir: Path, clips, work: Path) -> dict:
    """Both servers run at once (an idle one takes no CPU): each client count is measured on one
    right after the other, so a shared machine's changing load touches both alike."""
    modes = {"sequential": 1, "batched": args.max_batch}
    servers = {}
    try:
        for mode, max_batch in modes.items():
            options = ["--max-batch", max_batch, "--batch-window-ms", args.batch_window_ms]
            options += ["--max-new-tokens", args.max_new_tokens]
            options += ["--max-queue", 4 * max(args.clients)] + ["--compile"] * args.compile
            options += ["--threads", args.threads] if args.threads else []
            servers[mode] = ServerProcess(model_dir, work / f"server-{mode}.log", *options)
        for mode, server in servers.items():
            print(f"{mode}: waiting for the server (--max-batch {modes[mode]})", file=sys.stderr)
            server.wait_until_ready(timeout=3600)
        results = {mode: [] for mode in modes}
        for clients in args.clients:
            for mode, server in servers.items():
                run_clients(server, clips, clients, 1)  # untimed: first calls, steady state
                record = run_clients(server, clips, clients, args.requests)
                record["load_average"] = os.getloadavg()
                results[mode].append(record)
                print(_line(mode, record), file=sys.stderr)
        return results
    finally:
        for server in servers.values():
            server.stop()


def _line(mode: str, r: dict) -> str:
    return (
        f"{mode:>10} {r['clients']:>3} clients: {r['throughput']:7.2f} audio s/s, "
        f"p50 {r['p50_seconds']:.3f} s, p95 {r['p95_seconds']:.3f} s, "
        f"{r['batches']['mean_windows']:.1f} windows per call, load {r['load_average'][0]:.1f}"
    )


def summarise(results: dict) -> dict:
    """Batched over sequential at each client count, and p95 over the single-request latency."""
    single = results["sequential"][0]["p50_seconds"]  # one client, one request at a time
    rows = []
    for sequential, batched in zip(results["sequential"], results["batched"], strict=True):
        rows.append(
            {
                "clients": batched["clients"],
                "throughput_ratio": batched["throughput"] / sequential["throughput"],
                "batched_p95_over_single": batched["p95_seconds"] / single,
            }
        )
    return {"single_request_seconds": single, "rows": rows}


def markdown(results: dict, summary: dict) -> str:
    lines = [
        "| clients | mode | audio s/s | p50 (s) | p95 (s) | windows per call (mean, max ≤) "
        "| load avg |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("sequential", "batched"):
        for r in results[mode]:
            batches = r["batches"]
            lines.append(
                f"| {r['clients']} | {mode} | {r['throughput']:.2f} | {r['p50_seconds']:.3f} "
                f"| {r['p95_seconds']:.3f} | {batches['mean_windows']:.1f}, "
                f"{batches['largest_at_most']:g} | {r['load_average'][0]:.1f} |"
            )
    lines += ["", "| clients | batched / sequential throughput | batched p95 / single request |"]
    lines.append("|---|---|---|")
    for row in summary["rows"]:
        lines.append(
            f"| {row['clients']} | {row['throughput_ratio']:.2f}x "
            f"| {row['batched_p95_over_single']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fms-speech bench serve", description=__doc__)
    parser.add_argument("--model", type=Path, help="checkpoint (default: the embedded default)")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=4, help="timed requests per client")
    parser.add_argument("--clips", type=int, default=16, help="different clips")
    parser.add_argument("--clip-seconds", type=float, default=6.0, help="mean clip length")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16, help="of the batched server")
    parser.add_argument("--batch-window-ms", type=float, default=20.0)
    parser.add_argument("--compile", action="store_true", help="both servers compile the model")
    parser.add_argument("--threads", type=int, help="the servers' torch threads")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.clients[0] != 1:
        args.clients.insert(0, 1)  # the single-request latency the goal is measured against
    with tempfile.TemporaryDirectory(prefix="fms-speech-loadtest-") as temporary:
        work = Path(temporary)
        model_dir = args.model or build_default_checkpoint(work / "embedded-default")
        clips = make_clips(work, args.clips, args.clip_seconds)
        load_before = os.getloadavg()
        results = measure(args, model_dir, clips, work)
    summary = summarise(results)
    print(markdown(results, summary))
    document = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "load_average_before": load_before,
        "cpu_count": os.cpu_count(),
        "results": results,
        "summary": summary,
    }
    if args.output:
        args.output.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
