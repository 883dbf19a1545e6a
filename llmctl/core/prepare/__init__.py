"""Raw text to training data: input discovery, cleaning stages, tokenizer, parallel encoding, token shards.

The library behind `llmctl preprocess`, in the core because `llmctl train` runs the same preparation when a config
points at raw text. `prepare(cfg)` builds `data.dir`; `filter_text(cfg)` streams cleaned text.
"""

from llmctl.core.prepare.build import config_sha256, filter_text, prepare, stale_reason

__all__ = ["config_sha256", "filter_text", "prepare", "stale_reason"]
