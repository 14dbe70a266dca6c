"""The filesystem layer: one checkpoint directory on a pyarrow filesystem, retries and error
classification, and commit atomicity (rename vs. put).
"""
