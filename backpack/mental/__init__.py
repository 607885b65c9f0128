"""The Mental Process: per-task knowledge (persona, passages, experiences) recalled in front of teacher prompts."""
