"""Prompts from the checkpoint's tokenizer and chat template, `<|audio|>` expanded per clip."""

import pytest

from fms_speech.prompts import (
    PromptError,
    chat_text,
    instruction,
    load_tokenizer,
    prompt_ids,
)
from fms_speech.testing.reference import AUDIO_TOKEN, save_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(save_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def test_default_prompt_is_the_model_cards_transcription_request(tokenizer):
    text = chat_text(tokenizer, instruction())
    assert text == (
        "<|start_of_role|>user<|end_of_role|><|audio|>can you transcribe the speech into a "
        "written format?<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
    )


@pytest.mark.parametrize("count", [1, 7, 300])
def test_audio_placeholder_is_expanded_to_the_clips_token_count(tokenizer, count):
    ids = prompt_ids(tokenizer, chat_text(tokenizer, instruction()), count)
    assert ids.count(AUDIO_TOKEN) == count
    start = ids.index(AUDIO_TOKEN)
    assert ids[start : start + count] == [AUDIO_TOKEN] * count  # contiguous
    # the words around it are tokenized as without the placeholder
    assert tokenizer.decode(ids[start + count :]).startswith("can you transcribe")


def test_translate_names_the_language_and_needs_one():
    assert instruction("translate", "fr") == "<|audio|>can you translate the speech into French?"
    assert instruction("translate", "Klingon").endswith("into Klingon?")
    with pytest.raises(PromptError, match="needs a --language"):
        instruction("translate")
    with pytest.raises(PromptError, match="unknown task"):
        instruction("summarise")


def test_a_free_prompt_gets_the_audio_in_front_unless_it_places_it(tokenizer):
    assert instruction(prompt="what is said?") == "<|audio|>what is said?"
    assert instruction(prompt="listen: <|audio|> now") == "listen: <|audio|> now"
    with pytest.raises(PromptError, match="exactly once"):
        chat_text(tokenizer, "<|audio|><|audio|>twice")


def test_a_tokenizer_without_chat_template_is_refused(tmp_path):
    directory = save_tokenizer(tmp_path)
    config = directory / "tokenizer_config.json"
    (directory / "chat_template.jinja").unlink()
    config.write_text(config.read_text().replace('"chat_template"', '"unused_template"'))
    with pytest.raises(PromptError, match="no chat template"):
        load_tokenizer(directory)
