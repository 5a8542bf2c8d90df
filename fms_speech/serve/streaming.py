"""`stream=true`: server-sent events as OpenAI's client reads them.

Each event is one `data: {json}` line: `transcript.text.delta` events carry text as it becomes
final, `transcript.text.done` the whole text. The deltas joined are exactly the done text (and
the text a non-streamed request gets), because a delta is only ever the growth of a prefix of
that text:
- a one-window greedy request streams per token: the text decoded so far, normalised as the final
  text is, less its last word (a word may still grow, and a tokenizer may still glue the next
  token to it, e.g. "do" + "n't" -> "don't"); the held-back word follows with the next word;
- longer requests stream per window: window i's stitched share is final once windows 0..i+1
  have run (the seam with the next window may still trim its end), the last one at the end.
"""

import json

from fms_speech.stitch import stitch


def sse(event: dict) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


def delta_event(text: str) -> str:
    return sse({"type": "transcript.text.delta", "delta": text})


def done_event(text: str) -> str:
    return sse({"type": "transcript.text.done", "text": text})


class TextDeltas:
    """The deltas of one request's text; each method returns the new delta ("" if none)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sent = ""

    def add_token(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return self._grow(" ".join(text.split()[:-1]))

    def windows_done(self, window_texts: list[str]) -> str:
        """Windows 0..n-1 of the request have run (in order); all but the last share is final."""
        shares = stitch(window_texts)[:-1]
        return self._grow(" ".join(share for share in shares if share))

    def finish(self, text: str) -> str:
        """The rest of the final text; ValueError if the deltas sent are not its beginning."""
        if not text.startswith(self.sent):
            raise ValueError("the streamed text is not a prefix of the final text")
        return self._grow(text)

    def _grow(self, settled: str) -> str:
        # a settled text that is not an extension of what was sent waits for the next one
        if len(settled) <= len(self.sent) or not settled.startswith(self.sent):
            return ""
        delta, self.sent = settled[len(self.sent) :], settled
        return delta
