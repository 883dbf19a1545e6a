"""`llmctl train`. (First version: see issue 6.)"""
