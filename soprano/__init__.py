"""Soprano: a fast, streaming, lossless text-to-speech engine."""
