"""Segmentation service: model ensemble on Triton, attention map, hand-offs."""
