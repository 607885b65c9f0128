"""Evaluating students against their teachers: metrics per version, reports and plots."""
