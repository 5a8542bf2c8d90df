"""OpenAI's audio API on a real eager server, driven by the official openai client.

Every text is compared with what `fms-speech transcribe` writes for the same file and checkpoint
(greedy, each file alone): the same text, the same subtitles, the same segments.
"""

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from openai.types.audio import TranscriptionVerbose, TranslationVerbose
from serving import MAX_NEW_TOKENS, cli_outputs
from transformers import AutoTokenizer


def _check_segments(verbose, cli_json: dict, tokenizer) -> None:
    """verbose_json's segments: the CLI's, with every field OpenAI's type has, filled honestly."""
    expected = [(s["start"], s["end"], s["text"]) for s in cli_json["segments"]]
    actual = [(round(s.start, 3), round(s.end, 3), s.text) for s in verbose.segments]
    assert actual == expected
    for index, segment in enumerate(verbose.segments):
        assert segment.id == index and segment.temperature == 0.0
        assert segment.seek == round(segment.start * 100)
        assert segment.avg_logprob < 0 and 0 <= segment.no_speech_prob <= 1
        assert segment.compression_ratio > 0
        # a segment's tokens are its window's: with one window they decode to its text
        if len(verbose.segments) == 1:
            assert tokenizer.decode(segment.tokens, skip_special_tokens=True) == segment.text
        assert 0 < len(segment.tokens) <= MAX_NEW_TOKENS


def test_every_response_format_equals_the_cli(server, expected, speech_files, long_file):
    client = server.client()
    tokenizer = AutoTokenizer.from_pretrained(server.model_dir)
    for path in (speech_files[2], speech_files[5], long_file):
        cli = expected[path.stem]
        transcribe = client.audio.transcriptions.create
        result = transcribe(file=path, model=server.model)
        assert result.text == cli["json"]["text"]
        assert result.usage.seconds == pytest.approx(cli["json"]["duration"], abs=1e-3)
        for name, key in (("text", "txt"), ("srt", "srt"), ("vtt", "vtt")):
            assert transcribe(file=path, model=server.model, response_format=name) == cli[key]
        verbose = transcribe(
            file=path,
            model=server.model,
            response_format="verbose_json",
            timestamp_granularities=["segment"],
        )
        assert isinstance(verbose, TranscriptionVerbose)
        assert verbose.text == cli["json"]["text"] and verbose.language == "english"
        assert verbose.duration == pytest.approx(cli["json"]["duration"], abs=1e-3)
        _check_segments(verbose, cli["json"], tokenizer)
    assert len(verbose.segments) >= 2  # the long file: a segment per 30 s window with words


@pytest.mark.parametrize(
    "endpoint, fields, cli_options",
    [
        pytest.param(
            "translations",
            {"language": "fr"},
            ["--task", "translate", "--language", "fr"],
            id="translate-fr",
        ),
        pytest.param(
            "translations",
            {},
            ["--task", "translate", "--language", "en"],
            id="translate-default-en",
        ),
        pytest.param(
            "transcriptions",
            {"prompt": "one two three"},
            ["--prompt", "one two three"],
            id="prompt",
        ),
        pytest.param("transcriptions", {"num_beams": "3"}, ["--num-beams", "3"], id="beams"),
    ],
)
def test_task_prompt_and_beams_equal_the_cli(
    server, expected, speech_files, tmp_path_factory, endpoint, fields, cli_options
):
    path = speech_files[3]
    cli = cli_outputs(tmp_path_factory, server.model_dir, [path], *cli_options)[path.stem]
    assert cli["json"]["text"] != expected[path.stem]["json"]["text"]  # the option matters
    client = server.client()
    create = getattr(client.audio, endpoint).create
    language = fields.get("language")
    extra = {k: v for k, v in fields.items() if k != "prompt"}
    prompt = {"prompt": fields["prompt"]} if "prompt" in fields else {}
    result = create(file=path, model=server.model, extra_body=extra, **prompt)
    assert result.text == cli["json"]["text"]
    if endpoint == "translations":
        verbose = create(
            file=path, model=server.model, response_format="verbose_json", extra_body=extra
        )
        assert isinstance(verbose, TranslationVerbose)
        assert verbose.language == {"fr": "french", None: "english"}[language]
        assert verbose.text == cli["json"]["text"]


def test_streamed_deltas_join_to_the_text(server, expected, speech_files, long_file):
    """Per token for a one-window file, per window for a long one; joined they are the text."""
    client = server.client()
    for path in (speech_files[6], long_file):
        stream = client.audio.transcriptions.create(file=path, model=server.model, stream=True)
        events = list(stream)
        deltas = [event.delta for event in events[:-1]]
        assert all(event.type == "transcript.text.delta" for event in events[:-1])
        assert events[-1].type == "transcript.text.done"
        assert "".join(deltas) == events[-1].text == expected[path.stem]["json"]["text"]
        assert len(deltas) >= 2
        if path != long_file:  # the word-level tokenizer writes a word a step: a delta a word
            words = events[-1].text.split()
            assert deltas == [words[0], *(" " + word for word in words[1:])]


def test_concurrent_requests_each_get_their_own_text(server, expected, speech_files):
    """16 threads, 16 different files at once: no mix-up, none lost, and batches were formed."""
    client = server.client()
    before = server.metrics()

    def transcribe(path):
        return path.stem, client.audio.transcriptions.create(file=path, model=server.model).text

    with ThreadPoolExecutor(len(speech_files)) as pool:
        texts = dict(pool.map(transcribe, speech_files))
    assert texts == {path.stem: expected[path.stem]["json"]["text"] for path in speech_files}
    after = server.metrics()

    def change(name):
        return after[name] - before.get(name, 0.0)

    batches = change("fms_speech_batch_windows_count")
    assert change("fms_speech_batch_windows_sum") == len(speech_files)
    assert batches < len(speech_files)  # some model call held several requests' windows
    assert change('fms_speech_batch_windows_bucket{le="1.0"}') < batches
    assert after["fms_speech_requests_in_flight"] == 0 and after["fms_speech_queued_windows"] == 0
    assert change('fms_speech_requests_total{route="/v1/audio/transcriptions",status="200"}') == 16


def test_models_list_and_an_unknown_model_is_a_404(server, speech_files):
    client = server.client()
    assert [model.id for model in client.models.list()] == [server.model]
    assert client.models.retrieve(server.model).id == server.model
    with pytest.raises(openai.NotFoundError) as raised:
        client.audio.transcriptions.create(file=speech_files[0], model="whisper-1")
    assert raised.value.body == {
        "message": f"The model 'whisper-1' does not exist: this server serves '{server.model}'.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    server.assert_healthy()


def test_the_log_has_start_up_and_a_line_per_request(server):
    log = server.log()
    for line in ("loading", "warm-up done", "ready", "POST /v1/audio/transcriptions 200 in"):
        assert line in log
    assert "Traceback" not in log
