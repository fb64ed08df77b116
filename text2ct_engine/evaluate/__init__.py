"""Evaluation: the phantom finding detector (``evaluate.findings``) and its morphology helpers."""
