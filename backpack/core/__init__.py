"""The shared vocabulary, pure: the value types (Query, Completion, DecodingParams), the one Arrow schema between
actors and on disk, chat formatting, the training losses, and resource arithmetic for placement checks.

Nothing here imports Ray, Redis or transformers (a test keeps it so), so it is tested and reused anywhere; only
`losses.py` imports torch.
"""
