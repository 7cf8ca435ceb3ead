"""Training data: formats and loss masks (``formats``), reading and tokenizing files (``load``),
batching (``collate``), real data and models that install offline (``assets``), the ``data``
section of a run (``config``)."""

from .formats import IGNORE, DataError
from .load import Examples, data_path, read_token_blocks, split_holdout, tokenize_file

__all__ = ["DataError", "Examples", "IGNORE", "data_path", "read_token_blocks", "split_holdout", "tokenize_file"]
