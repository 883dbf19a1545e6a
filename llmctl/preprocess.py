"""`llmctl preprocess`: clean text, train or reuse a tokenizer, and write token shards; or, with `--to-text`, act as
a streaming text filter. The work is done by llmctl.core.prepare, which `train` shares."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from llmctl.config import Config
from llmctl.core import prepare as library


def run(cfg: Config, *, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Prepare `cfg.data.dir` from `cfg.data.inputs` (stdin when empty); the summary says whether it was skipped."""
    return library.prepare(cfg, force=force, quiet=quiet)


def filter_text(cfg: Config, *, quiet: bool = False) -> Iterator[str]:
    """The cleaned text of the inputs, in pieces as they are ready (see `data.text_format`)."""
    return library.filter_text(cfg, quiet=quiet)
