"""Per-shard stages (caption → embed → score) and the pool-wide aggregate and publish steps."""
