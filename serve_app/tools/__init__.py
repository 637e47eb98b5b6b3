"""Offline tools: train, convert and export the models the service runs."""
