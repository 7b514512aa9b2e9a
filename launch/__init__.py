"""Launching: the CPU demo, local torchrun (single and multi-node), VESSL, Docker."""
