"""SeRALM's item knowledge: generation by an LLM and the on-disk knowledge cache
(:mod:`recbole_llm.knowledge.generation`), text encoding into vectors
(:mod:`recbole_llm.knowledge.encoding`).

Nothing is imported eagerly, so ``python -m recbole_llm.knowledge.generation`` runs cleanly.
"""

__all__ = ["encoding", "generation"]
