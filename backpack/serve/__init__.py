"""Serving students: the StudentServer (any version, OpenAI-compatible, hot-swapped on promotion)."""
