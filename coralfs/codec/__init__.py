"""Encoding: chunk records and the lossless tensor codecs (and their compiled loops)."""
