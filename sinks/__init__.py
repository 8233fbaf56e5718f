"""Storage side of xmodal-index.

Lives here: the Arrow schema of rows (schema.py is its only definition), the workdir
layout (workdir.py is the only module that spells it), the ledger, dead letters and
part files, embedding Parquet reads (embeddings_io.py), and three sub-packages:
storage/ (URI storage, conditional writes, the lease), index/ (choosing, building,
publishing FAISS index versions) and serving/ (what a query node loads and searches).
May import pyarrow, faiss, numpy, boto3. Must not import apache_beam, click or torch
(enforced by tests/test_layering.py), so query nodes load indexes without Beam or torch.
"""
