"""The pure core: types, the Arrow schema, config, routing policies and manifest logic.

Nothing in this package imports Ray, torch or transformers, so it can be tested and reused anywhere.
"""
