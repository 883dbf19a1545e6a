"""llmctl: a command-line toolchain for the whole language-model workflow (preprocess, train, generate, eval)."""

__version__ = "0.1.0"
