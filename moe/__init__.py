"""gradax.moe."""
