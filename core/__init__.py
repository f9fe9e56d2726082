"""evalhost: batch-composition studies of language models (solo vs batched generation, paired)."""
__version__ = "0.1.0"
