"""Retrieval benchmarks: our knowledge store against the stock LangChain pipeline, on the same questions.

``python -m benchmarks.retrieval_quality --help`` runs them; ``data/`` holds the fictional bilingual corpus and
its questions, ``haystack.py`` finds Debian's manuals to mix in as distractors.
"""
