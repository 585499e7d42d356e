"""Records: the ledger, conversation memory, stats, metrics, logs and events."""
