"""Text: incremental detokenization of each sequence, released once final, and stop strings (`_TextTail`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Text: incremental detokenization and stop strings


class _TextTail:
    """A sequence's completion text, grown token by token. Text is released once it is final: complete characters
    only, and never the last len(longest stop) - 1 characters, which could still turn out to start a stop string."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.released = 0
        self.stopped = False
        context = list(prompt_ids[-8:])  # a few prompt tokens, so that the first piece decodes as it would in context
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            stream = DecodeStream(ids=context, skip_special_tokens=True)
            self._decode = lambda token: stream.step(backend, token)
        else:
            self._decode = _SlowStream(tokenizer, context).step

    def push(self, token: int) -> str:
        """Add one generated token; return the text that became final."""
        piece = self._decode(token)
        if piece:
            start = max(0, len(self.text) - self.hold)  # a stop string ending in `piece` starts no earlier
            self.text += piece
            if self.stop:
                found = [at for at in (self.text.find(s, start) for s in self.stop) if at >= 0]
                if found:
                    self.text = self.text[: min(found)]
                    self.stopped = True
                    return self.finish()
        return self._release(len(self.text) - self.hold)

    def finish(self) -> str:
        """The sequence ended: release everything left."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self.released:
            return ""
        out, self.released = self.text[self.released:end], end
        return out


class _SlowStream:
    """Incremental decoding for tokenizers without a Rust backend: decode a short window and hand out what it adds,
    holding back while the window ends in an incomplete character."""

    def __init__(self, tokenizer, context: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(context)
        self.prefix = 0
        self.read = len(self.ids)

    def step(self, token: int) -> str | None:
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return None
