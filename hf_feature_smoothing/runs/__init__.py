"""Dataset-scale runs: resumable JSONL records and plots of certificates."""
