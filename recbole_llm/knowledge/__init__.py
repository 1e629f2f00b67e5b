"""SeRALM's item knowledge: the prompt and its answers (:mod:`~recbole_llm.knowledge.prompts`),
the cache's identity (:mod:`~recbole_llm.knowledge.identity`), the resumable store
(:mod:`~recbole_llm.knowledge.store`), batched generation (:mod:`~recbole_llm.knowledge.generator`),
all of it from a RecBole config (:mod:`~recbole_llm.knowledge.generation`, whose command line is
:mod:`~recbole_llm.knowledge.cli`), and text encoding into vectors (:mod:`~recbole_llm.knowledge.encoding`).

Nothing is imported eagerly, so ``python -m recbole_llm.knowledge.generation`` runs cleanly.
"""

__all__ = ["cli", "encoding", "generation", "generator", "identity", "prompts", "store"]
