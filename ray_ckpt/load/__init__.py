"""A load: the validator (open and check a checkpoint), the extent reader (coalesced, checksummed
reads), matching a target state dict, map_location, the reader.
"""
