"""The shared core: model, tokenizer, optimizer and schedule, device/seed/distributed setup, checkpoints, inputs.

Every command (`llmctl.preprocess`, `llmctl.train`, `llmctl.generate`, `llmctl.evaluate`) builds on these modules;
commands never import each other.
"""
