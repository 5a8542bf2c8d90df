"""Prompts: the checkpoint's tokenizer and chat template, with `<|audio|>` expanded per clip.

The model writes one audio vector over each `<|audio|>` token, so a prompt carries exactly as many
placeholders as its clip has audio tokens. The user writes one `<|audio|>`; it is expanded here,
after the chat template, so the template never sees thousands of placeholders.
"""

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

AUDIO_PLACEHOLDER = "<|audio|>"
# Granite's chat template (roles between special tokens, one message per turn), for the
# tokenizers this project builds: the demo model's, the tests' and the bench's
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content']"
    " + '<|end_of_text|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)
TRANSCRIBE_INSTRUCTION = "can you transcribe the speech into a written format?"
TRANSLATE_INSTRUCTION = "can you translate the speech into {language}?"

# ISO 639-1 codes of languages a user is likely to ask for; any other value is used as written
LANGUAGES = {
    "ar": "Arabic",
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "fr": "French",
    "hi": "Hindi",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "nl": "Dutch",
    "pl": "Polish",
    "pt": "Portuguese",
    "ru": "Russian",
    "zh": "Chinese",
}


class PromptError(ValueError):
    """A task, language or prompt that cannot be turned into a model prompt."""


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer; it must know `<|audio|>` and carry a chat template."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.convert_tokens_to_ids(AUDIO_PLACEHOLDER) in (None, tokenizer.unk_token_id):
        raise PromptError(f"the tokenizer in {model_dir} has no {AUDIO_PLACEHOLDER} token")
    if not tokenizer.chat_template:
        raise PromptError(f"the tokenizer in {model_dir} has no chat template")
    return tokenizer


def instruction(task: str = "transcribe", language: str | None = None, prompt: str | None = None):
    """The user message: a free prompt, or the default one for the task."""
    if prompt is not None:
        return prompt if AUDIO_PLACEHOLDER in prompt else AUDIO_PLACEHOLDER + prompt
    if task == "transcribe":
        return AUDIO_PLACEHOLDER + TRANSCRIBE_INSTRUCTION
    if task == "translate":
        if not language:
            raise PromptError("--task translate needs a --language (e.g. fr)")
        name = LANGUAGES.get(language.lower(), language)
        return AUDIO_PLACEHOLDER + TRANSLATE_INSTRUCTION.format(language=name)
    raise PromptError(f"unknown task {task!r}: choose transcribe or translate")


def chat_text(tokenizer: PreTrainedTokenizerBase, user_message: str) -> str:
    """The chat-templated prompt, ready for the assistant's answer."""
    if user_message.count(AUDIO_PLACEHOLDER) != 1:
        raise PromptError(f"a prompt must hold {AUDIO_PLACEHOLDER} exactly once")
    messages = [{"role": "user", "content": user_message}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str, num_audio_tokens: int) -> list[int]:
    """Token ids of a chat-templated prompt with its `<|audio|>` expanded to the clip's count."""
    # as the reference's processor does: expand the text, then tokenize it whole
    expanded = text.replace(AUDIO_PLACEHOLDER, AUDIO_PLACEHOLDER * num_audio_tokens)
    return tokenizer(expanded, add_special_tokens=False)["input_ids"]
