"""`fms-speech serve` with a granite_speech5 (CTC) checkpoint saved by the reference.

Its text equals the CLI's for the same file and checkpoint; `timestamp_granularities=["word"]`
gives the CLI's word times in OpenAI's `words`; what a CTC model cannot do (translate, a prompt,
beams) is a 400 naming it, and the server goes on serving.
"""

import openai
import pytest
from serving import cli_outputs, start_server

# untied, one subsampling block: it emits many words (see tests/test_cli_ctc.py)
CONFIG = "ctc_untied_late_subsampling"


@pytest.fixture(scope="module")
def ctc_dir(ctc_checkpoints):
    return ctc_checkpoints[CONFIG][2]


@pytest.fixture(scope="module")
def ctc_server(request, tmp_path_factory, ctc_dir):
    return start_server(request, tmp_path_factory, ctc_dir, "ctc", "--max-batch", 4)


@pytest.fixture(scope="module")
def ctc_expected(tmp_path_factory, ctc_dir, speech_files):
    files = speech_files[:4]
    return files, cli_outputs(tmp_path_factory, ctc_dir, files)


def test_text_and_word_times_equal_the_cli(ctc_server, ctc_expected):
    files, expected = ctc_expected
    client = ctc_server.client()
    for path in files:
        cli = expected[path.stem]["json"]
        verbose = client.audio.transcriptions.create(
            file=path,
            model=ctc_server.model,
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
        )
        assert verbose.text == cli["text"] and cli["text"]
        cli_words = [word for segment in cli["segments"] for word in segment["words"]]
        assert [(w.word, w.start, w.end) for w in verbose.words] == [
            (w["word"], pytest.approx(w["start"], abs=1e-3), pytest.approx(w["end"], abs=1e-3))
            for w in cli_words
        ]
        assert [s.text for s in verbose.segments] == [s["text"] for s in cli["segments"]]
        srt = client.audio.transcriptions.create(
            file=path, model=ctc_server.model, response_format="srt"
        )
        assert srt == expected[path.stem]["srt"]
        stream = client.audio.transcriptions.create(file=path, model=ctc_server.model, stream=True)
        events = list(stream)
        assert events[-1].type == "transcript.text.done" and events[-1].text == cli["text"]
        assert "".join(event.delta for event in events[:-1]) == cli["text"]


@pytest.mark.parametrize(
    "ask, param",
    [
        (lambda c, f, m: c.audio.translations.create(file=f, model=m), None),
        (lambda c, f, m: c.audio.transcriptions.create(file=f, model=m, prompt="say"), "prompt"),
        (
            lambda c, f, m: c.audio.transcriptions.create(
                file=f, model=m, extra_body={"num_beams": 2}
            ),
            "num_beams",
        ),
    ],
    ids=["translate", "prompt", "beams"],
)
def test_what_a_ctc_model_cannot_do_is_a_400(ctc_server, ctc_expected, ask, param):
    files, _ = ctc_expected
    with pytest.raises(openai.BadRequestError) as raised:
        ask(ctc_server.client(), files[0], ctc_server.model)
    error = raised.value.body
    assert error["code"] == "unsupported_value" and error["param"] == param
    assert error["message"].startswith("This model is a CTC model")
    ctc_server.assert_healthy()


def test_word_timestamps_stay_refused_for_an_llm_model(server, speech_files):
    with pytest.raises(openai.BadRequestError) as raised:
        server.client().audio.transcriptions.create(
            file=speech_files[0],
            model=server.model,
            response_format="verbose_json",
            timestamp_granularities=["word"],
        )
    error = raised.value.body
    assert (error["param"], error["code"]) == ("timestamp_granularities", "unsupported_value")
