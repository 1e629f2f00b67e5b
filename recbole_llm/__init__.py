"""recbole-llm: LLM-based sequential recommenders as ordinary RecBole models."""
from recbole_llm import compat, registry

compat.apply()
registry.register_datasets()

from recbole_llm.quick_start import load_config, run, run_recbole_llm  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load_config", "run", "run_recbole_llm", "__version__"]
