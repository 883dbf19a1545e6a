"""`llmctl preprocess`: clean text, train or reuse a tokenizer, write token shards. (First version: see issue 3.)"""
