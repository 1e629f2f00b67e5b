"""Run recbole-llm models and RecBole baselines with RecBole's run_recbole.py flags."""
from recbole_llm.cli import main

if __name__ == "__main__":
    main()
