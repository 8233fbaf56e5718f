"""xmodal-index: offline batch indexing of media archives into one cross-modal space.

Subpackages (each says what it may import):
  xmodal_index.encoders  embedding models, hash heads, training objectives (torch, numpy)
  xmodal_index.sinks     Arrow schema, Parquet, FAISS shards, index versions, storage (no beam/torch)
  xmodal_index.pipeline  Beam composites, decoding, segmenting, dead letters
  xmodal_index.jobs      click commands, configs, runner wiring, exit codes
"""

__version__ = "0.1.0"
