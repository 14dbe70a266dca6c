"""The on-disk format, pure (no I/O, no Ray): file names, the data-file header, the commit marker,
the manifest, the bucket layout and the encoded tree.
"""
