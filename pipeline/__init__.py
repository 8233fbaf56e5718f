"""Beam side of xmodal-index.

Lives here: PTransforms (ListArchive, DecodeSegments, EncodeSegments,
WriteEmbeddings) and their private DoFns, media decoding and segmenting, isolated
decode workers, dead-letter routing, metrics. May import apache_beam, encoders and
sinks. Must not import click (enforced by tests/test_layering.py).
"""
