"""Storage side of xmodal-index.

Lives here: the Arrow schema of embedding rows (schema.py is its only definition),
Parquet writing and reading, FAISS shard builds, index versions and manifests, the
query-node loader, object-store access. May import pyarrow, faiss, numpy, boto3.
Must not import apache_beam, click or torch (enforced by tests/test_layering.py),
so query nodes load indexes without Beam or torch.
"""
