"""Federated math, pure: node sampling, aggregation, compressed updates, server optimizers."""
