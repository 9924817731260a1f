"""Trainer of a small language model that writes checkpoints for ckpt-watcher to manage."""
