"""Index versions: choosing, building, searching and publishing FAISS shards.

Lives here: the build config and the budget chooser (choice.py), the streaming shard
build (build.py), the manifest that describes a version (manifest.py) and its strict
schema (manifest_schema.py), the version's seal: manifest digest, HMAC, LATEST and SEAL
records (seal.py), the publish gate (publish_gate.py), and incremental versions: delta
shards and tombstones on a parent (incremental.py, tombstones.py) and when to compact
them (compaction.py). May import pyarrow, faiss, numpy and the sibling packages of
sinks/; must not import apache_beam, click or torch.
"""
