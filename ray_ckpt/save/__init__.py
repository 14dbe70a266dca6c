"""A save, in the order it runs: protocol (the messages that cross between actors) -> stager ->
pipeline (the caller) -> encoder -> writer (the node's actor) and pool -> commit -> barrier (the
multi-rank actor) and dedup (replicated items across ranks).
"""
