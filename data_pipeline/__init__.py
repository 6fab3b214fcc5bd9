"""Hippo's data pipeline: text -> tokenized webdataset shards -> deterministic, resumable batches.

Modules (one job each): `tokenizer` (byte / Hugging Face / BPE training), `sources` (reading
jsonl, jsonl.zst, txt with bad-record accounting), `packing` and `shard_io` (windows and tar
shards), `manifest`, `journal` and `prepare` (the resumable prepare run), `sample_index` (each sample's
byte offset), `sample_order` (the global sample order as a pure function), `sample_reader` (one
positioned read per sample), `stream` (the stateful training iterable), `remote` (URL opening
with retries), `inspection` (inspect / verify), `default_corpus` and `cli`.
Nothing is imported here so that `import data_pipeline.x` stays light (no torch for prepare).
"""
