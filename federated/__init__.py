"""gradax.federated."""
