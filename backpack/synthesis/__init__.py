"""Prompt synthesis: the teachers write new prompts (self_instruct.py: Self-Instruct from seed tasks). Pure:
the driver is backpack/run/synthesize.py, curation backpack/data/curation.py."""
