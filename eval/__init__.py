"""Image and text metrics for the Di4C domain scripts (importable functions, no training code)."""
