"""Retrieval-augmented generation: embeddings (embed.py), a chunk index with exact and FAISS
search (index.py), retrieval + generation and its evaluation (pipeline.py), and the embedded
document store and questions (corpus.py)."""
