"""One module per chapter: the orchestration, tables and prose of that chapter's notebook
(``chNN_topic.py`` for ``notebooks/NN_topic.ipynb``). Reusable science lives in :mod:`mergelab.analysis`."""
