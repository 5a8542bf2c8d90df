"""The server under torchrun: one tensor-parallel model over 2 ranks (gloo, 127.0.0.1), rank 0
serving HTTP and leading every batch, rank 1 following (fms_speech.distributed.Lockstep).

The checkpoint is the shared one (4 query heads split over the ranks, 1 KV head replicated):
its answers must be the single-process server's, word for word.
"""

import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from serving import MAX_NEW_TOKENS, start_server

from fms_speech.serve.process import free_port

TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def tp_server(request, tmp_path_factory, model_dir):
    launcher = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    launcher += ["--master-port", str(free_port()), "-m"]
    return start_server(
        request,
        tmp_path_factory,
        model_dir,
        "tensor-parallel",
        *("--max-new-tokens", MAX_NEW_TOKENS, "--max-batch", 8, "--batch-window-ms", 100),
        *("--timeout-seconds", 300),
        launcher=launcher,
    )


@pytest.mark.slow
def test_the_tensor_parallel_server_answers_as_one_process(
    tp_server, server, speech_files, long_file
):
    files = [*speech_files[:6], long_file]

    def ask(target, path):
        return target.client().audio.transcriptions.create(file=path, model=target.model).text

    before = tp_server.metrics()
    with ThreadPoolExecutor(len(files)) as pool:  # concurrent: requests share model calls
        texts = list(pool.map(lambda path: ask(tp_server, path), files))
    after = tp_server.metrics()
    assert texts == [ask(server, path) for path in files]
    assert len(set(texts)) == len(files)  # texts that could be mixed up
    calls = after["fms_speech_batch_windows_count"] - before["fms_speech_batch_windows_count"]
    windows = after["fms_speech_batch_windows_sum"] - before["fms_speech_batch_windows_sum"]
    assert windows == len(files) + 2 and calls < windows  # the long file has 3 windows

    # SIGTERM to torchrun, which passes it on: rank 0 shuts down and releases rank 1 (which
    # ignores the signal), and rank 1 says how many batches it ran
    tp_server.stop()
    log = tp_server.log()
    followed = re.findall(r"rank 1 INFO rank 0 stopped serving; this rank ran (\d+) batches", log)
    assert followed and int(followed[0]) >= calls + 2, log[-3000:]  # + the two warm-up batches
    assert "lost contact" not in log and " ERROR " not in log
