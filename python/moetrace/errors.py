"""The one error type of the reader: its message names the file and what was expected."""


class StoreError(Exception):
    """A trace store (manifest or shard) that cannot be read as format v1."""
