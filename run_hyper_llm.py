"""Hyper-parameter search for recbole-llm models and RecBole baselines with RecBole's run_hyper.py flags."""
from recbole_llm.hyper import main

if __name__ == "__main__":
    main()
