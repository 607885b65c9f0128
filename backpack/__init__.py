"""Backpack: distil small student language models from teacher models on Ray."""

__version__ = "0.1.0"
