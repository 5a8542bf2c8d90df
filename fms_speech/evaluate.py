"""`fms-speech eval`: word and character error rates of a model on a manifest.

References and hypotheses are both normalised with whisper-normalizer's English normaliser
(lower case, punctuation removed, spellings and numbers made uniform), then scored with jiwer.
Per-file rates are reported beside the overall ones; overall rates are corpus-level (total
errors over total reference words or characters), not the mean of the per-file rates.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fms_speech.train_data import read_manifest
from fms_speech.transcribe import TranscribeOptions, Transcriber


@dataclass
class FileScore:
    audio: str
    reference: str
    hypothesis: str
    wer: float | None  # None when the file failed
    cer: float | None
    words: int  # reference words after normalisation
    error: str | None = None


@dataclass
class EvalReport:
    wer: float
    cer: float
    files: list[FileScore] = field(default_factory=list)
    failed: int = 0
    options: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def table(self) -> str:
        """A Markdown table: one row per file, then the overall rates."""
        lines = [
            "| file | WER % | CER % | words | hypothesis |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for score in self.files:
            if score.error is not None:
                lines.append(f"| {score.audio} | - | - | {score.words} | error: {score.error} |")
                continue
            lines.append(
                f"| {score.audio} | {100 * score.wer:.1f} | {100 * score.cer:.1f} | "
                f"{score.words} | {score.hypothesis.replace('|', ' ')} |"
            )
        lines.append(
            f"| **overall** | **{100 * self.wer:.2f}** | **{100 * self.cer:.2f}** | "
            f"{sum(s.words for s in self.files)} | {self.failed} failed |"
        )
        return "\n".join(lines) + "\n"


def normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def score(references: list[str], hypotheses: list[str]) -> tuple[float, float]:
    """Corpus (WER, CER) of normalised texts; an empty normalised reference is skipped."""
    import jiwer

    normalise = normalizer()
    pairs = [(normalise(r), normalise(h)) for r, h in zip(references, hypotheses, strict=True)]
    pairs = [(r, h) for r, h in pairs if r.strip()]
    if not pairs:
        raise ValueError("no reference has any words after normalisation")
    refs, hyps = zip(*pairs, strict=True)
    return jiwer.wer(list(refs), list(hyps)), jiwer.cer(list(refs), list(hyps))


def evaluate(
    transcriber: Transcriber,
    manifest: str | Path,
    options: TranscribeOptions | None = None,
    progress=None,
) -> EvalReport:
    """Transcribe every file of a JSON-lines manifest ({"audio", "text"}) and score it.

    A file that fails (unreadable audio) is reported with its error and counts as all words
    deleted in the overall rates, so failures never flatter the score.
    """
    import jiwer

    entries = read_manifest(Path(manifest))
    options = options or TranscribeOptions()
    results = transcriber.transcribe(
        [str(audio) for audio, _ in entries], options, errors="record", progress=progress
    )
    normalise = normalizer()
    files, references, hypotheses = [], [], []
    for (audio, text), result in zip(entries, results, strict=True):
        reference, hypothesis = normalise(text), normalise(result.text)
        words = len(reference.split())
        if result.error is not None or not reference.strip():
            files.append(FileScore(str(audio), text, result.text, None, None, words, result.error))
            if reference.strip():
                references.append(reference)
                hypotheses.append("")
            continue
        references.append(reference)
        hypotheses.append(hypothesis)
        files.append(
            FileScore(
                str(audio),
                text,
                result.text,
                jiwer.wer(reference, hypothesis),
                jiwer.cer(reference, hypothesis),
                words,
            )
        )
    if not references:
        raise ValueError(f"no entry of {manifest} has a reference with words")
    return EvalReport(
        wer=jiwer.wer(references, hypotheses),
        cer=jiwer.cer(references, hypotheses),
        files=files,
        failed=sum(score.error is not None for score in files),
        options=asdict(options),
    )
