"""Embedding models for xmodal-index.

Lives here: encoder loading, preprocessing front-ends, modality towers, hash heads,
training objectives, checkpoints. May import torch and numpy. Must not import
apache_beam, click or boto3 (enforced by tests/test_layering.py).
"""
