"""Joining the texts of overlapping windows of one long recording.

Consecutive windows share about a second of audio, so the words spoken there appear at the end of
one window's text and at the start of the next. The seam is found as the longest run of words the
two texts share near it; the earlier window keeps its words up to the end of that run and the
later one continues after it. Words a window heard only partly at its edge fall outside the run
and are dropped. Without a convincing run the texts are simply concatenated: a repeated word is
a smaller harm than a lost one.
"""

import re

# the overlap is ~1 s of speech; a few words at most, this many leaves room for slow decoding
SEAM_WORDS = 12


def _comparable(word: str) -> str:
    return re.sub(r"[^\w']", "", word.lower())


def find_seam(previous: list[str], following: list[str]) -> tuple[int, int]:
    """(words of `previous` to keep, words of `following` to skip) to join them without repeats."""
    tail = [_comparable(word) for word in previous[-SEAM_WORDS:]]
    head = [_comparable(word) for word in following[:SEAM_WORDS]]
    offset = len(previous) - len(tail)
    # longest common run of words; on ties the one nearest the seam
    best_length, best_end_tail, best_end_head = 0, 0, 0
    run = [[0] * (len(head) + 1) for _ in range(len(tail) + 1)]
    for i in range(1, len(tail) + 1):
        for j in range(1, len(head) + 1):
            if tail[i - 1] and tail[i - 1] == head[j - 1]:
                run[i][j] = run[i - 1][j - 1] + 1
                nearer = (i - j) >= (best_end_tail - best_end_head)
                if run[i][j] > best_length or (run[i][j] == best_length and nearer):
                    best_length, best_end_tail, best_end_head = run[i][j], i, j
    if best_length == 0:
        return len(previous), 0
    # one shared word is only trusted at the seam (at most one partly heard word beside it):
    # common words repeat by chance
    stray_words = (len(tail) - best_end_tail) + (best_end_head - 1)
    if best_length == 1 and stray_words > 1:
        return len(previous), 0
    return offset + best_end_tail, best_end_head


def stitch(texts: list[str]) -> list[str]:
    """Each window's share of the joined text, in order (empty where a window adds nothing)."""
    words = [text.split() for text in texts]
    keep_from = [0] * len(words)
    keep_to = [len(window) for window in words]
    for index in range(1, len(words)):
        previous = words[index - 1][keep_from[index - 1] :]
        kept, skipped = find_seam(previous, words[index])
        keep_to[index - 1] = keep_from[index - 1] + kept
        keep_from[index] = skipped
    return [
        " ".join(window[start:end])
        for window, start, end in zip(words, keep_from, keep_to, strict=True)
    ]
