"""recbole-llm: LLM-based sequential recommenders as ordinary RecBole models."""
from recbole_llm import compat, plugin, registry

compat.apply()
registry.register_datasets()
plugin.install()  # RecBole's own run_recbole, objective_function, Config... find our models by name

from recbole_llm.quick_start import load_config, run, run_recbole_llm  # noqa: E402
from recbole_llm.config import properties_dir  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load_config", "run", "run_recbole_llm", "__version__"]
