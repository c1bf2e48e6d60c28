"""Data: toy verifiable tasks, JSONL datasets, the tiny tokenizer, chat encoding, packing, decontamination.

Modules: tasks (arithmetic / countdown items, SFT responses), jsonl (validated reading), tokenizer
(the 512-id test tokenizer), chat (prompt and SFT-pair encoding with a loss mask), packing
(best-fit-decreasing rows with block-diagonal masks), decontam (10-gram overlap filter).
"""
