"""minilab: the whole life of a small language model in one reproducible tool."""

__version__ = "0.1.0"
