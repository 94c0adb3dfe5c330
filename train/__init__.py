"""Activation harvesting, activation stores and sparse-autoencoder training."""
