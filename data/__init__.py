"""Datasets: raw readers, processing to {prompt, response, metadata}, validation, training loader."""

from data.loader import IGNORE_INDEX, Batch, LoaderConfig, TrainLoader
from data.records import DataError, Record, read_records, write_records
from data.tokenized import TokenizedSplit, load_tokenized

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "DataError",
    "LoaderConfig",
    "Record",
    "TokenizedSplit",
    "TrainLoader",
    "load_tokenized",
    "read_records",
    "write_records",
]
