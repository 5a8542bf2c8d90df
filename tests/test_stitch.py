"""Joining the texts of overlapping windows: no doubled words, no lost words."""

import pytest

from fms_speech.stitch import find_seam, stitch


@pytest.mark.parametrize(
    ("texts", "joined"),
    [
        # the overlap heard whole by both windows
        (["the quick brown fox", "brown fox jumps over"], "the quick brown fox jumps over"),
        # case and punctuation differ at the seam
        (["one two Three,", "three four five."], "one two Three, four five."),
        # the later window heard the first overlap word only in part
        (
            ["we walked to the old mill", "ld mill and back home"],
            "we walked to the old mill and back home",
        ),
        # the earlier window heard the last overlap word only in part
        (["seven eight nine te", "eight nine ten eleven"], "seven eight nine ten eleven"),
        # nothing shared: keep every word
        (["alpha beta", "gamma delta"], "alpha beta gamma delta"),
        # one shared common word away from the seam is chance, not overlap
        (
            ["the cat sat on the mat", "a dog saw the bird"],
            "the cat sat on the mat a dog saw the bird",
        ),
        # one shared word right at the seam is the overlap
        (["north south east", "east west"], "north south east west"),
        # an empty window (silence) in the middle
        (["first part here", "", "and the end"], "first part here and the end"),
        # three windows, two seams
        (["a b c d e", "d e f g h", "g h i j"], "a b c d e f g h i j"),
    ],
)
def test_stitch_joins_without_repeats_or_losses(texts, joined):
    assert " ".join(share for share in stitch(texts) if share) == joined


def test_each_window_keeps_its_own_share():
    shares = stitch(["the quick brown fox", "brown fox jumps over", "over the lazy dog"])
    assert shares == ["the quick brown fox", "jumps over", "the lazy dog"]


def test_the_longest_shared_run_wins_over_a_shorter_one_nearer_the_seam():
    kept, skipped = find_seam(["x", "y", "z", "a", "b", "c", "d"], ["a", "b", "c", "d", "e", "a"])
    assert (kept, skipped) == (7, 4)
