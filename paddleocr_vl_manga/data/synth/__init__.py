"""Synthetic manga text lines (fonts, text, rendering, the multi-process run)."""
