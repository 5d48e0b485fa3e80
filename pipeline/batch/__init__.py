"""`run --mode batch`: the same work as online mode, sent through a Batch API (`/v1/files` +
`/v1/batches`) at the batch price, and collected into the same output files.

- `ids`: the `custom_id` of a work item (reversible: the join key of the answers).
- `lines`: one job -> one JSONL request line, exactly the body online mode sends.
- `plan`: shards planned on lines, bytes and estimated queued tokens at once, written as they fill.
- `ledger`: `OUT/batches/ledger.json`, the record of every shard and batch (atomic writes).
- `work`: the work left of a prepared run as shards; `--dry-run --mode batch`; `--batch-files-only DIR`
  (shards for another server such as `vllm run-batch`, nothing sent).
- `api`, `collect`, `flow`: upload, submit, poll, download, join, retry, cancel.
- `online`: an online run in a folder with batches leaves their work to them (never asked twice).

Imports flow one way: `pipeline.batch` uses run/ledger/data/providers, never review.
"""
