"""`fms-speech serve`: its options, and start-up (load, listen, warm up, ready) with log lines."""

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch

from fms_speech import distributed
from fms_speech.transcribe import DTYPES, TranscribeOptions, Transcriber

API_KEY_VARIABLE = "FMS_SPEECH_API_KEY"
log = logging.getLogger("fms_speech.serve")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory")
    parser.add_argument(
        "--served-model-name", help="the name clients send as `model` (default: DIR's name)"
    )
    parser.add_argument("--compile", action="store_true", help="run the model under torch.compile")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--threads", type=_positive_int, help="torch threads (default: all cores)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=_positive_int, default=8000)
    parser.add_argument("--max-batch", type=_positive_int, default=8, help="windows per model call")
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=20.0,
        help="how long the oldest waiting window waits for others to share its call",
    )
    parser.add_argument(
        "--max-queue",
        type=_positive_int,
        default=64,
        help="requests waiting or running; more are refused with 503",
    )
    parser.add_argument("--max-upload-mb", type=float, default=25.0, help="largest request body")
    parser.add_argument(
        "--max-audio-seconds", type=float, default=3600.0, help="longest audio accepted"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=200,
        help="tokens per window (the default and the most a request may ask for)",
    )
    parser.add_argument("--num-beams", type=_positive_int, default=1, help="default decoding")
    parser.add_argument("--window-seconds", type=float, default=30.0, help="long-audio windows")
    parser.add_argument("--overlap-seconds", type=float, default=1.0)
    parser.add_argument(
        "--api-key", help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_VARIABLE})"
    )
    parser.add_argument(
        "--timeout-seconds",
        type=float,
        default=distributed.DEFAULT_TIMEOUT_SECONDS,
        help="under torchrun (tensor parallel): how long a rank waits for the others",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _configure_logging(rank: int = 0) -> None:
    handler = logging.StreamHandler(sys.stderr)
    where = f" rank {rank}" if rank else ""
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s fms-speech{where} %(levelname)s %(message)s")
    )
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _options(args: argparse.Namespace) -> TranscribeOptions:
    """Every request's starting options; ValueError (one sentence) for unusable flags."""
    if args.max_upload_mb <= 0 or args.batch_window_ms < 0:
        raise ValueError("--max-upload-mb must be above 0 and --batch-window-ms at least 0")
    if args.timeout_seconds <= 0:
        raise ValueError("--timeout-seconds must be more than 0")
    return TranscribeOptions(
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        batch_size=args.max_batch,
        window_seconds=args.window_seconds,
        overlap_seconds=args.overlap_seconds,
        max_audio_seconds=args.max_audio_seconds,
    )


def _load(args: argparse.Namespace, device, parallel: str | None) -> Transcriber:
    """The model to serve; ValueError (one sentence) if it cannot be served."""
    started = time.perf_counter()
    log.info("loading %s (%s, %s%s)", args.model, device, args.dtype, ", compiled" * args.compile)
    try:
        transcriber = Transcriber.from_pretrained(
            args.model, device=device, dtype=args.dtype, compile=args.compile, parallel=parallel
        )
    except (ValueError, OSError, RuntimeError) as error:  # CheckpointError is a ValueError
        raise ValueError(str(error).splitlines()[0]) from None
    log.info("loaded in %.1f s", time.perf_counter() - started)
    return transcriber


def run_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted; 2 if the options or the checkpoint are unusable, or (under
    torchrun) if the ranks lose each other."""
    try:
        launch = distributed.Launch.from_env()
    except ValueError as error:
        _configure_logging()
        log.error("%s", error)
        return 2
    _configure_logging(launch.rank if launch is not None else 0)
    try:
        options = _options(args)
    except ValueError as error:
        log.error("%s", error)
        return 2
    if args.threads:  # before loading: compiled kernels keep the count they were built for
        torch.set_num_threads(args.threads)
    if launch is None or launch.world_size == 1:
        try:
            transcriber = _load(args, args.device, None)
        except ValueError as error:
            log.error("%s", error)
            return 2
        return _serve(args, options, transcriber)
    return _serve_tensor_parallel(args, options, launch)


def _serve_tensor_parallel(args, options: TranscribeOptions, launch: distributed.Launch) -> int:
    """Under torchrun: every rank loads its part of one tensor-parallel model (FMS's strategy);
    rank 0 serves HTTP and leads each batch, the other ranks run them until rank 0 stops."""
    try:
        device = distributed.rank_device(launch, args.device)
        distributed.start(launch, device, args.timeout_seconds)
    except (ValueError, distributed.DistributedError) as error:
        log.error("%s", error)
        return 2
    try:
        transcriber, problem = None, None
        try:
            transcriber = _load(args, device, "tp")
        except ValueError as error:
            problem = str(error)
        problem = distributed.agreed_problem(problem, launch)
        if problem is not None:  # every rank knows; rank 0 says it
            if launch.rank == 0:
                log.error("%s", problem)
            return 2
        if launch.rank != 0:
            # Ctrl-C and torchrun's SIGTERM reach every rank: the followers leave when rank 0,
            # having answered what it had, tells them to (or when it is gone: the timeout)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            batches = transcriber.follow()
            log.info("rank 0 stopped serving; this rank ran %d batches", batches)
            return 0
        # a heartbeat well within the timeout keeps idle followers waiting
        return _serve(args, options, transcriber, idle_seconds=args.timeout_seconds / 4)
    except distributed.DistributedError as error:
        log.error("%s", error)
        return 2
    finally:
        distributed.stop()


def _serve(
    args, options: TranscribeOptions, transcriber: Transcriber, idle_seconds: float | None = None
) -> int:
    import uvicorn

    from fms_speech.serve.app import create_app
    from fms_speech.serve.batcher import Batcher
    from fms_speech.serve.metrics import ServerMetrics
    from fms_speech.serve.openai_api import Limits

    name = args.served_model_name or Path(args.model).resolve().name
    log.info("serving %s as '%s'", args.model, name)
    exit_code = [0]
    server: uvicorn.Server | None = None

    def fatal(message: str) -> None:
        log.error("%s", message)
        exit_code[0] = 2
        if server is not None:
            server.should_exit = True

    metrics = ServerMetrics()
    batcher = Batcher(
        transcriber,
        metrics,
        max_batch=args.max_batch,
        batch_window_seconds=args.batch_window_ms / 1000,
        max_queue=args.max_queue,
        warm_up_options=options,
        on_fatal=fatal,
        idle_seconds=idle_seconds,
    )
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    app = create_app(
        transcriber,
        batcher,
        metrics,
        Limits(name, options, ctc=transcriber.ctc is not None),
        api_key=api_key,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
    )
    # one worker process: the model is loaded once, in this process
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        workers=1,
        access_log=False,  # RequestLog writes one line per request
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    log.info(
        "max batch %d windows, batch window %g ms, max queue %d requests, API key %s; warming up%s",
        args.max_batch,
        args.batch_window_ms,
        args.max_queue,
        "required" if api_key else "off",
        " (compiling the model)" if args.compile else "",
    )
    batcher.start()
    server.run()  # its shutdown stops the batcher (fms_speech.serve.app's lifespan)
    return exit_code[0]
