"""Evaluation: prompts, KV-cache decoding (incl. self-speculative), sandboxed execution, pass@k."""
