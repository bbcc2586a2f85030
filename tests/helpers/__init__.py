"""Helpers shared by several test folders (import them as ``helpers.<module>``)."""
