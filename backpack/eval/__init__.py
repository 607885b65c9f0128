"""Evaluating students against their teachers: metrics per version, fact accuracy, the promotion gate of a
continual run, reports and plots."""
