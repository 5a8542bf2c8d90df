"""CTC decoding on tensors, word timestamps, joining windows and segments (fms_speech.ctc)."""

import itertools

import pytest
import torch

from fms_speech.ctc import (
    MAX_SEGMENT_SECONDS,
    PAUSE_SECONDS,
    EmittedToken,
    TimedWindow,
    Word,
    WordSplitter,
    greedy_decode,
    join_windows,
    segments_from_words,
)
from fms_speech.testing.reference import BLANK, save_ctc_tokenizer

FRAME = 0.08


def _logits_for(best: list[list[int]], vocab: int = 12) -> torch.Tensor:
    """Logits whose per-frame argmax is `best`."""
    logits = torch.randn(len(best), len(best[0]), vocab, generator=torch.Generator().manual_seed(0))
    for row, frames in enumerate(best):
        for frame, token in enumerate(frames):
            logits[row, frame, token] = 10.0
    return logits


def _oracle(best: list[int], length: int) -> list[tuple[int, int, int]]:
    """Runs of the argmax within the clip, blanks dropped: (token, first frame, last frame)."""
    runs, frame = [], 0
    for token, group in itertools.groupby(best[:length]):
        size = len(list(group))
        if token != BLANK:
            runs.append((token, frame, frame + size - 1))
        frame += size
    return runs


def test_greedy_decode_merges_repeats_drops_blanks_and_padding():
    best = [
        [3, 3, 0, 3, 5, 5, 5, 0, 0, 7, 7, 2],  # a repeat across a blank is a second token
        [0, 0, 4, 4, 4, 4, 9, 9, 9, 9, 9, 9],  # padded from frame 8: the run is cut there
        [6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6],  # no valid frame at all
    ]
    lengths = torch.tensor([12, 8, 0])
    decoded = greedy_decode(_logits_for(best), lengths, BLANK)
    for row, clip in enumerate(decoded):
        got = [(t.token_id, t.first_frame, t.last_frame) for t in clip]
        assert got == _oracle(best[row], int(lengths[row])), row
    assert [t.token_id for t in decoded[0]] == [3, 3, 5, 7, 2]
    assert decoded[2] == []


def test_greedy_decode_random_against_the_oracle():
    generator = torch.Generator().manual_seed(1)
    best = torch.randint(0, 4, (5, 40), generator=generator).tolist()  # many blanks and repeats
    lengths = torch.tensor([40, 1, 17, 39, 23])
    decoded = greedy_decode(_logits_for(best, vocab=4), lengths, BLANK)
    for row, clip in enumerate(decoded):
        got = [(t.token_id, t.first_frame, t.last_frame) for t in clip]
        assert got == _oracle(best[row], int(lengths[row]))


@pytest.fixture(scope="module")
def splitter(tmp_path_factory):
    from transformers import AutoTokenizer

    directory = save_ctc_tokenizer(tmp_path_factory.mktemp("ctc_tokenizer"))
    return WordSplitter(AutoTokenizer.from_pretrained(directory), FRAME)


def _ids(splitter, *pieces) -> list[int]:
    return splitter.tokenizer.convert_tokens_to_ids(list(pieces))


def test_words_start_at_marked_pieces_and_span_their_tokens_frames(splitter):
    ids = _ids(splitter, "▁one", "▁fox", "s", "▁quick", "ly", "▁quick")
    tokens = [
        EmittedToken(ids[0], 0, 2),
        EmittedToken(ids[1], 4, 4),
        EmittedToken(ids[2], 5, 6),
        EmittedToken(ids[3], 9, 9),
        EmittedToken(ids[4], 10, 10),
        EmittedToken(ids[5], 11, 13),  # the same word again: a real repeat
    ]
    decoded = splitter.window_words(tokens)
    assert [w.text for w in decoded.words] == ["one", "foxs", "quickly", "quick"]
    spans = [x for w in decoded.words for x in (w.start, w.end)]
    assert spans == pytest.approx([0.0, 0.24, 0.32, 0.56, 0.72, 0.88, 0.88, 1.12])
    assert decoded.word_tokens == [(0, 1), (1, 3), (3, 5), (5, 6)]
    # the repeated word survives decoding: the CTC tokenizer must not merge it again
    assert splitter.text(decoded.token_ids) == "one foxs quickly quick"


def _window(splitter, start, end, spoken: list[tuple[str, int, int]]) -> TimedWindow:
    """A window at [start, end] s whose words are (piece, first frame, last frame)."""
    tokens = [EmittedToken(_ids(splitter, piece)[0], a, b) for piece, a, b in spoken]
    return TimedWindow(start, end, splitter.window_words(tokens))


def test_join_keeps_each_word_once_at_the_seam(splitter):
    # two windows overlapping on [2.0, 3.0] s (seam 2.5 s); "▁four" (2.40-2.64 s) straddles it
    first = _window(
        splitter,
        0.0,
        3.0,
        [("▁one", 2, 4), ("▁two", 10, 12), ("▁three", 20, 26), ("▁four", 30, 32)],
    )
    # seen from 2.0 s: the end of "three" (1.60-2.16 s), "four" and "five" whole
    second = _window(splitter, 2.0, 5.0, [("▁three", 0, 1), ("▁four", 5, 7), ("▁five", 15, 18)])
    text, words = join_windows([first, second], splitter, duration=5.0)
    assert text == "one two three four five"
    assert [w.text for w in words] == ["one", "two", "three", "four", "five"]
    # "four": midpoint 2.52 s in the first window's view, after the seam: the second's
    assert words[3].start == pytest.approx(2.40) and words[3].end == pytest.approx(2.64)
    starts = [w.start for w in words]
    assert starts == sorted(starts)


def test_join_takes_a_word_only_the_later_window_heard(splitter):
    first = _window(splitter, 0.0, 3.0, [("▁one", 2, 4)])
    second = _window(splitter, 2.0, 5.0, [("▁two", 4, 6), ("▁three", 20, 22)])
    text, words = join_windows([first, second], splitter, duration=5.0)
    assert text == "one two three"  # "two" (2.32-2.56 s) was cut off in the first window


def test_join_clips_word_ends_to_the_audio(splitter):
    only = _window(splitter, 0.0, 1.0, [("▁one", 10, 12)])
    _, words = join_windows([only], splitter, duration=0.99)
    assert words[0].end == pytest.approx(0.99)


def test_segments_split_at_pauses_and_long_segments_at_their_longest_pause():
    words = [Word(0.0, 0.3, "a"), Word(0.4, 0.6, "b"), Word(0.6 + PAUSE_SECONDS, 1.5, "c")]
    assert [[w.text for w in s] for s in segments_from_words(words)] == [["a", "b"], ["c"]]
    # no pause long enough, but longer than MAX_SEGMENT_SECONDS: cut at the widest gap
    steady = [Word(0.4 * i, 0.4 * i + 0.3, f"w{i}") for i in range(40)]
    steady[25] = Word(steady[25].start + 0.05, steady[25].end, "w25")
    pieces = segments_from_words(steady)
    assert [len(p) for p in pieces] == [25, 15]
    assert all(p[-1].end - p[0].start <= MAX_SEGMENT_SECONDS for p in pieces)
    assert segments_from_words([]) == []
