"""SafeDIG: SAE safety dictionaries at routed DiT positions, decoder adaptation, Blend and Repel."""
