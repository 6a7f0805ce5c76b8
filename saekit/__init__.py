"""saekit: sparse autoencoders, from UFLDL's sigmoid autoencoder to TopK dictionaries."""

__version__ = "0.8.0"
