"""`llmctl eval`. (First version: see issue 5.)"""
