"""The pure core: types, the Arrow schema, config, routing policies and manifest logic.

Nothing in this package imports Ray or transformers, so it can be tested and reused anywhere; only
`losses.py` imports torch.
"""
