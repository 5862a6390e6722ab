"""Orchestrations above training and evaluation: the quick start and the over-optimisation experiment in the
miniature world, and the seconds-long demo on tiny random models."""
