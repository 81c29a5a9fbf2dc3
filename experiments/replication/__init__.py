"""The small-scale replication study run by ``experiments/replicate.py``: its sizes and recipe (``recipe``),
the corpus and tokenizer (``data``), the language-model runs (``lm``) and their evaluations (``evals``),
associative recall (``recall``) and the report (``report``)."""
