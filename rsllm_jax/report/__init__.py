"""Reporting: the experiments driver and the tables, overview figure and curves it commits.

Reads what runs leave behind (results.json, metrics.jsonl, per-row hits); the training and
evaluation library never imports it."""
