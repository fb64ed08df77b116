"""Data: procedural chest-CT phantoms, CT-RATE-layout loading and preprocessing, latent caches."""
