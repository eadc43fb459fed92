"""SIEVE curation of DataComp-format image-text pools: caption → embed → score → aggregate → publish."""

__version__ = "0.1.0"
