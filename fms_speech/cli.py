"""`fms-speech`: the command line (`transcribe`, `compile`, `eval`, `train`, `serve`, and `bench`
from fms_speech.bench).

Exit codes: 0 every input transcribed; 1 some inputs failed; 2 nothing was transcribed (bad
arguments, an unusable checkpoint, or every input failed). Each failure is one line on stderr.

Under torchrun, `transcribe` runs on every rank: `--parallel tp` splits one model over the ranks
(rank 0 reads the inputs and writes the outputs), `--parallel data` gives each rank a model and
a share of the files (each rank writes its outputs); rank 0 gives the exit code over all ranks.
"""

import argparse
import dataclasses
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from fms_speech import distributed
from fms_speech.bench import cli as bench_cli
from fms_speech.serve.server import add_serve_arguments, run_serve
from fms_speech.transcribe import (
    DTYPES,
    PARALLEL_MODES,
    SEGMENTATIONS,
    TranscribeOptions,
    Transcriber,
    Transcription,
)
from fms_speech.writers import WRITERS, output_formats, write_result

EXIT_OK, EXIT_SOME_FAILED, EXIT_NOTHING_RAN = 0, 1, 2
# the model that ships inside the package (docs/demo-model.md), used when --model is not given
DEMO_MODEL = Path(__file__).parent / "assets" / "demo"
DEMO_NOTICE = (
    "fms-speech: no --model given: using the built-in demo model, a small Granite Speech trained "
    "on synthetic English speech (eSpeak NG); pass --model DIR for a real checkpoint"
)


def _add_transcribe(commands) -> None:
    parser = commands.add_parser("transcribe", help="transcribe or translate audio files")
    parser.add_argument("files", nargs="+", metavar="FILE", help="wav, flac, ogg or mp3 files")
    _add_model_arguments(parser)
    parser.add_argument(
        "--output-format",
        choices=[*WRITERS, "all"],
        default="txt",
        help="txt (default), json, srt, vtt, tsv, or all (needs --output-dir); on stdout, any "
        "format but txt takes one FILE",
    )
    parser.add_argument(
        "--output-dir", type=Path, help="write FILE's result to DIR/<stem>.<format>; else stdout"
    )
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    parser.add_argument(
        "--parallel",
        choices=PARALLEL_MODES,
        help="under torchrun: tp (one model split over the ranks; the default) or data (a "
        "model and a share of the files per rank)",
    )
    parser.add_argument(
        "--timeout-seconds",
        type=float,
        default=distributed.DEFAULT_TIMEOUT_SECONDS,
        help="under torchrun: how long a rank waits for the others before it gives up",
    )


def _add_eval(commands) -> None:
    parser = commands.add_parser("eval", help="word and character error rates on a manifest")
    parser.add_argument("manifest", type=Path, help='JSON lines of {"audio": path, "text": ...}')
    _add_model_arguments(parser)
    parser.add_argument("--output", type=Path, help="also write the report as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")


def _add_train(commands) -> None:
    from fms_speech.train import add_train_arguments

    add_train_arguments(commands.add_parser("train", help="train a Granite Speech model"))


def _add_model_arguments(parser) -> None:
    """The checkpoint, how to run it and what to ask of it (transcribe and eval)."""
    parser.add_argument(
        "--model", metavar="DIR", help="checkpoint directory (default: the built-in demo model)"
    )
    parser.add_argument("--compile", action="store_true", help="run the model under torch.compile")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="windows per batch")
    parser.add_argument("--task", choices=["transcribe", "translate"], default="transcribe")
    parser.add_argument("--language", help="target language of --task translate, e.g. fr")
    parser.add_argument("--prompt", help="a free instruction instead of the task's")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=200)
    parser.add_argument("--num-beams", type=_positive_int, default=1)
    parser.add_argument("--max-audio-seconds", type=float, help="refuse longer inputs")
    parser.add_argument("--window-seconds", type=float, default=30.0, help="long-audio windows")
    parser.add_argument("--overlap-seconds", type=float, default=1.0)
    parser.add_argument(
        "--segmentation",
        choices=SEGMENTATIONS,
        default=TranscribeOptions.segmentation,
        help="long audio: fixed overlapping windows, or speech regions found by silero-vad",
    )


def _add_compile(commands) -> None:
    parser = commands.add_parser(
        "compile",
        help="precompile a checkpoint for --compile (a warm start in seconds)",
        description="Export and compile the model's prefill and decode steps ahead of time "
        "(minutes) into a cache that `transcribe --compile` and the Python API use when they "
        "find artifacts made for the same checkpoint config, dtype, device, thread count and "
        "versions; otherwise they compile just in time.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="where the artifacts go (default: $FMS_SPEECH_CACHE, else ~/.cache/fms-speech); "
        "transcribe reads $FMS_SPEECH_CACHE",
    )
    parser.add_argument("--force", action="store_true", help="rebuild artifacts that exist")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        help="torch threads, as `serve --threads` will run (default: all cores; part of the key)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fms-speech", description="Granite Speech on the Foundation Model Stack"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_transcribe(commands)
    _add_compile(commands)
    _add_eval(commands)
    _add_train(commands)
    bench_cli.add_command(commands)
    add_serve_arguments(
        commands.add_parser("serve", help="an OpenAI-compatible transcription server")
    )
    return parser


def _fail(message: str) -> None:
    print(f"fms-speech: error: {message}", file=sys.stderr)


def _output_stems(files: list[str]) -> list[str]:
    """Output names from the inputs' stems; a repeated stem gets -2, -3... so none overwrites."""
    stems, seen = [], {}
    for file in files:
        stem = Path(file).stem or "audio"
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def _would_overwrite_input(args, files: list[str], stems: list[str]) -> str | None:
    inputs = {os.path.realpath(file) for file in files}
    for stem in stems:
        for name in output_formats(args.output_format):
            path = os.path.realpath(args.output_dir / f"{stem}.{name}")
            if path in inputs:
                return path
    return None


def _progress_bar(args, total: int):
    if args.no_progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="file", file=sys.stderr, disable=total < 2)


def _report(
    result: Transcription, args, stem: str, metadata: dict, single: bool, lines=None
) -> bool:
    """Write or print one result (or append its stdout line to `lines`); False if it failed."""
    if result.error is not None:
        _fail(result.error)
        return False
    if args.output_dir is None:
        if args.output_format == "txt":
            line = result.text if single else f"{result.source}\t{result.text}"
        else:  # one file (_stdout_problem): the chosen format as it would be written
            line = WRITERS[args.output_format](result, metadata).rstrip("\n")
        if lines is None:
            print(line, flush=True)
        else:
            lines.append((result.index, line))
        return True
    try:
        write_result(result, args.output_dir, stem, output_formats(args.output_format), metadata)
    except OSError as error:
        _fail(f"cannot write the output of {result.source}: {error.strerror or error}")
        return False
    return True


def options_from(args: argparse.Namespace) -> TranscribeOptions:
    """The TranscribeOptions whose fields the parsed arguments name (ValueError if invalid)."""
    names = [f.name for f in dataclasses.fields(TranscribeOptions) if hasattr(args, f.name)]
    return TranscribeOptions(**{name: getattr(args, name) for name in names})


def _stdout_problem(args) -> str | None:
    """Why the results cannot go to stdout in --output-format (one sentence), or None."""
    if args.output_dir is not None or args.output_format == "txt":
        return None
    if args.output_format == "all":
        return "--output-format all writes one file per format: give --output-dir"
    if len(args.files) > 1:
        return f"--output-format {args.output_format} on stdout takes one file: give --output-dir"
    return None


def transcribe(args) -> int:
    try:
        options = options_from(args)
    except ValueError as error:
        _fail(str(error))
        return EXIT_NOTHING_RAN
    problem = _stdout_problem(args)
    if problem is not None:
        _fail(problem)
        return EXIT_NOTHING_RAN
    try:
        launch = distributed.Launch.from_env()
    except ValueError as error:
        _fail(str(error))
        return EXIT_NOTHING_RAN
    if launch is not None and launch.world_size > 1:
        return _transcribe_under_torchrun(args, options, launch)
    if args.parallel is not None and launch is None:
        _fail(f"--parallel {args.parallel} needs a torchrun launch (WORLD_SIZE is not set)")
        return EXIT_NOTHING_RAN
    stems = _output_stems(args.files)
    if not _prepare_output_dir(args, stems):
        return EXIT_NOTHING_RAN
    transcriber = _load(args)
    if transcriber is None:
        return EXIT_NOTHING_RAN
    succeeded = _transcribe_files(transcriber, args, options, list(enumerate(args.files)), stems)
    return exit_code(succeeded, len(args.files))


def _prepare_output_dir(args, stems: list[str]) -> bool:
    """Create --output-dir; False (after one line on stderr) if it cannot be used."""
    problem = _output_dir_problem(args, stems)
    if problem is not None:
        _fail(problem)
    return problem is None


def _transcribe_files(
    transcriber, args, options, files: list[tuple[int, str]], stems, lines=None, progress=True
) -> int:
    """Transcribe `files` ((index among args.files, path)) and report each; how many succeeded.

    `lines`: collect the stdout lines as (index, line) instead of printing them.
    """
    metadata = {
        "model": str(args.model),
        "device": str(transcriber.device),
        "dtype": args.dtype,
        "compile": args.compile,
        "task": args.task,
    }
    succeeded = 0
    try:
        results = transcriber.stream([path for _, path in files], options)
    except ValueError as error:  # an option this model cannot honour (a CTC model: --prompt)
        _fail(str(error))
        return 0
    single = len(args.files) == 1
    bar = _progress_bar(args, len(files)) if progress else None
    for result in results:
        index = files[result.index][0]
        result.index = index
        succeeded += _report(result, args, stems[index], metadata, single, lines)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return succeeded


def exit_code(succeeded: int, total: int) -> int:
    if succeeded == total:
        return EXIT_OK
    return EXIT_SOME_FAILED if succeeded else EXIT_NOTHING_RAN


def compile_checkpoint(args) -> int:
    """`fms-speech compile`: the artifacts of one checkpoint, dtype and device."""
    from fms_speech import aot

    if args.threads:  # inductor writes the thread count into its CPU kernels
        torch.set_num_threads(args.threads)
    try:
        transcriber = Transcriber.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    except (ValueError, OSError, RuntimeError) as error:  # CheckpointError is a ValueError
        _fail(str(error).splitlines()[0])
        return EXIT_NOTHING_RAN
    try:
        report = aot.prepare(transcriber.model, args.cache_dir, force=args.force)
    except Exception as error:  # noqa: BLE001  (export/compile errors of any kind: one line)
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        _fail(f"cannot precompile {args.model}: {type(error).__name__}: {message}")
        return EXIT_NOTHING_RAN
    if report.reused:
        print(f"up to date: {report.directory}")
    else:
        times = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in report.seconds.items())
        print(f"compiled into {report.directory} ({times})")
    return EXIT_OK


# ---- under torchrun: every rank runs `transcribe`; rank 0 speaks for the run


def _transcribe_under_torchrun(args, options, launch: distributed.Launch) -> int:
    """Join the ranks, load the model on each, run the files; rank 0's exit code is the run's
    (the other ranks exit 0 unless they lose contact with the rest)."""
    try:
        device = distributed.rank_device(launch, args.device)
        distributed.start(launch, device, args.timeout_seconds)
    except ValueError as error:  # the group never formed: each rank says what it met
        _fail(f"rank {launch.rank}: {error}" if launch.rank else str(error))
        return EXIT_NOTHING_RAN
    except distributed.DistributedError as error:
        _fail(str(error))
        return EXIT_NOTHING_RAN
    try:
        return _run_ranks(args, options, launch, device)
    except distributed.DistributedError as error:
        _fail(str(error))
        return EXIT_NOTHING_RAN
    finally:
        distributed.stop()


def _run_ranks(args, options, launch: distributed.Launch, device) -> int:
    parallel = args.parallel or "tp"
    leads = launch.rank == 0
    # data-parallel ranks finish at different times: their summary waits longer than a step
    summary_group = (
        dist.new_group(backend="gloo", timeout=distributed.SUMMARY_TIMEOUT)
        if parallel == "data"
        else None
    )
    stems = _output_stems(args.files)
    writes = leads or parallel == "data"
    problem = distributed.agreed_problem(
        _output_dir_problem(args, stems) if writes else None, launch
    )
    transcriber = None
    if problem is None:
        _default_model(args, say=leads)
        try:
            transcriber = Transcriber.from_pretrained(
                args.model, device=device, dtype=args.dtype, compile=args.compile, parallel=parallel
            )
        except (ValueError, OSError, RuntimeError) as error:
            problem = str(error).splitlines()[0]
        problem = distributed.agreed_problem(problem, launch)
    if problem is not None:  # every rank knows; rank 0 says it
        if leads:
            _fail(problem)
        return EXIT_NOTHING_RAN if leads else EXIT_OK
    if parallel == "tp":
        if not leads:
            transcriber.follow()
            return EXIT_OK
        try:
            files = list(enumerate(args.files))
            succeeded = _transcribe_files(transcriber, args, options, files, stems)
        except distributed.DistributedError:
            raise  # the ranks are out of step: nothing more to say to them
        except BaseException:
            transcriber.close()  # release the other ranks before going down
            raise
        transcriber.close()
        return exit_code(succeeded, len(args.files))
    share = [(i, path) for i, path in enumerate(args.files) if i % launch.world_size == launch.rank]
    lines = [] if args.output_dir is None else None
    succeeded = _transcribe_files(transcriber, args, options, share, stems, lines, progress=leads)
    summaries = [None] * launch.world_size if leads else None
    with distributed.collective(launch.rank, "gathering the ranks' results"):
        dist.gather_object((succeeded, lines or []), summaries, group=summary_group, group_dst=0)
    if not leads:
        return EXIT_OK
    total = sum(count for count, _ in summaries)
    for _, line in sorted(line for _, rank_lines in summaries for line in rank_lines):
        print(line, flush=True)
    print(
        f"fms-speech: {total} of {len(args.files)} inputs transcribed by {launch.world_size} ranks",
        file=sys.stderr,
    )
    return exit_code(total, len(args.files))


def _output_dir_problem(args, stems) -> str | None:
    """Why --output-dir cannot be used (one sentence), or None."""
    if args.output_dir is None:
        return None
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot create the output directory {args.output_dir}: {error.strerror}"
    clash = _would_overwrite_input(args, args.files, stems)
    if clash is not None:
        return f"an output would overwrite the input {clash}; choose another --output-dir"
    return None


def _default_model(args, say: bool) -> None:
    """No --model: the demo model, with a line on stderr when `say`."""
    if args.model is None:
        if say:
            print(DEMO_NOTICE, file=sys.stderr)
        args.model = str(DEMO_MODEL)


def _load(args) -> Transcriber | None:
    """The checkpoint of --model (the demo model without it); None after a one-line error."""
    _default_model(args, say=True)
    try:
        return Transcriber.from_pretrained(
            args.model, device=args.device, dtype=args.dtype, compile=args.compile
        )
    except (ValueError, OSError, RuntimeError) as error:  # CheckpointError is a ValueError
        _fail(str(error).splitlines()[0])
        return None


def evaluate(args) -> int:
    from fms_speech.evaluate import evaluate as evaluate_manifest
    from fms_speech.train_data import ManifestError, read_manifest

    try:
        options = options_from(args)
        read_manifest(args.manifest)  # a bad manifest fails before the model loads
    except ValueError as error:  # ManifestError is a ValueError
        _fail(str(error))
        return EXIT_NOTHING_RAN
    transcriber = _load(args)
    if transcriber is None:
        return EXIT_NOTHING_RAN
    try:
        report = evaluate_manifest(transcriber, args.manifest, options)
    except (ManifestError, ValueError) as error:
        _fail(str(error).splitlines()[0])
        return EXIT_NOTHING_RAN
    for score in report.files:
        if score.error is not None:
            _fail(score.error)
    print(report.table(), end="")
    if args.output is not None:
        try:
            args.output.write_text(report.to_json())
        except OSError as error:
            _fail(f"cannot write {args.output}: {error.strerror or error}")
            return EXIT_SOME_FAILED
    if report.failed == len(report.files):
        return EXIT_NOTHING_RAN
    return EXIT_SOME_FAILED if report.failed else EXIT_OK


def _quiet_libraries() -> None:
    # the user asked for text; library chatter would bury the one-line errors
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("fms").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "serve"]:  # the server's load benchmark: options of its own
        from fms_speech.bench import load

        return load.main(argv[2:])
    args = _parser().parse_args(argv)
    _quiet_libraries()
    if args.command == "transcribe":
        return transcribe(args)
    if args.command == "compile":
        return compile_checkpoint(args)
    if args.command == "eval":
        return evaluate(args)
    if args.command == "train":
        from fms_speech.train import run_train

        return run_train(args)
    if args.command == "bench":
        return bench_cli.run(args)
    if args.command == "serve":
        return run_serve(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
