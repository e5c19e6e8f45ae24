"""Shipped YAML recipes, one folder per modality, named after the paper recipe they reproduce."""
