"""`llmctl generate`. (First version: see issue 4.)"""
