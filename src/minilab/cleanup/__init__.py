"""Giving disk back: `cleanup` (runs and checkpoints), `du` (where it went), `cache` (the HF hub cache)."""
