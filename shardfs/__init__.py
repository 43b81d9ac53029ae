"""shardfs: ML model checkpoints as compressed, replicated, content-addressed chunks."""

__version__ = "0.1.0"
