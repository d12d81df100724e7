"""Evaluation: metrics (pure), the TF-IDF baseline, running models over examples, reports."""
