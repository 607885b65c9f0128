"""The Mental Process: per-task knowledge (persona, passages, experiences) in a versioned Redis store, ranked by
BM25 and recalled in front of teacher prompts (the pack file format is `backpack.config.knowledge`)."""
