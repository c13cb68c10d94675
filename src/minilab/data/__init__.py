"""The data pipeline: raw sources -> corpus shards -> tokenizer -> packed token shards.

`corpus` cleans, filters and deduplicates raw text into JSONL shards; `tokenizer` trains and
fingerprints a tokenizer on them; `pack` tokenizes into fixed-dtype token files that `mixture`
reads as weighted, resumable streams of training windows. Every stage writes a `manifest.json`
with SHA-256 hashes of what it read and wrote, and refuses inputs whose hashes do not match.
"""
