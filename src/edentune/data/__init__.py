"""Data pipeline: chat logs in, clean ChatML training sets out.

records (robust JSONL reading, counts that add up) -> validate / convert -> clean (scrub, lengths,
language, duplicates) -> stats -> split -> mix. `cli` holds the `edentune data` commands.
"""
