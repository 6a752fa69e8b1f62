"""Triton implementations of dinv's kernel primitives (contract: docs/kernels.md)."""
