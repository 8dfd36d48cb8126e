"""Metrics (CER, exact match under four normalizations), evaluation runs and their reports."""
