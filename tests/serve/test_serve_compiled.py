"""A `--compile` server: the CLI's text, and no compilation after the start-up warm-up.

Start-up compiles the batch-1 and the dynamic graph of prefill and decode (tens of seconds each
here); requests of one window, of several at once, of a long file and with beams then reuse them.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
from serving import cli_outputs, start_server


@pytest.mark.slow
def test_compiled_server_gives_the_cli_text_and_compiles_nothing_more(
    request, tmp_path_factory, model_dir, expected, speech_files, long_file
):
    server = start_server(
        request,
        tmp_path_factory,
        model_dir,
        "compiled",
        *("--compile", "--max-new-tokens", 6, "--max-batch", 4, "--batch-window-ms", 200),
    )
    warmed = server.metrics()
    assert warmed["fms_speech_compiled_graphs"] >= 2  # prefill and decode at least
    client = server.client()
    transcribe = client.audio.transcriptions.create

    path = speech_files[1]  # alone: a batch of one window
    assert transcribe(file=path, model=server.model).text == expected[path.stem]["json"]["text"]
    with ThreadPoolExecutor(8) as pool:  # together: batches of up to four windows
        texts = list(pool.map(lambda p: transcribe(file=p, model=server.model).text, speech_files))
    assert texts == [expected[p.stem]["json"]["text"] for p in speech_files]
    long_text = transcribe(file=long_file, model=server.model, response_format="text")
    assert long_text == expected[long_file.stem]["txt"]
    path = speech_files[3]
    beams = cli_outputs(tmp_path_factory, model_dir, [path], "--num-beams", 3)[path.stem]
    answer = transcribe(file=path, model=server.model, extra_body={"num_beams": 3})
    assert answer.text == beams["json"]["text"]

    after = server.metrics()
    assert after["fms_speech_compiled_graphs"] == warmed["fms_speech_compiled_graphs"]
    batches = after["fms_speech_batch_windows_count"]
    assert after['fms_speech_batch_windows_bucket{le="1.0"}'] < batches  # batches of several ran
    assert "Traceback" not in server.log()
