"""The output folder as a ledger: one run at a time, damage quarantined, nothing paid for lost or doubled.

`lock` (one run per folder), `csvscan` (reading a CSV that may be torn or hand-damaged), `quarantine`
(moving the bad bytes to `<name>.rejected`, the rest rewritten atomically), `recover` (what a run does to
the folder before its first request), `pending` (answers that could not be written yet),
`inputs` (what the folder's rows were made from, and refusing to mix other work into them), `costs`
(every paid answer on the books: the folder's spent total, billed failures, unknown prices).
"""
