"""Turns GeoTIFF corpora into ArrayRecord datasets; also writes the synthetic corpus."""
