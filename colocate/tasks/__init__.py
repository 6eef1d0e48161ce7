"""Verifiable tasks: prompts with checkable answers."""
