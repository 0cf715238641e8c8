"""The sync engine, in the order an event passes through it.

queueing (Redis, the RQ queue) → inbox (accepted events) → jobs (what workers run) →
handling (a batch of events) → identity (user id → email) → ledger and plays (merged state
per contact and per play) → flush (batches to the CRM) → worker (the process); runtime holds
what every job is handed: settings, mapping, CRM adapter, email lookup.
"""
