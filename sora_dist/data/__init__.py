"""Training data: formats and loss masks (``formats``, ``chat``), sources -> tokenized, cached,
memory-mapped sets (``pipeline``), packing (``packing``), batching (``collate``), real data and models
that install offline (``assets``), the ``data`` section of a run (``config``)."""

from .formats import IGNORE, DataError
from .pipeline import Examples, data_path, prepare_split, read_token_blocks, split_holdout, tokenize_file

__all__ = ["DataError", "Examples", "IGNORE", "data_path", "prepare_split", "read_token_blocks", "split_holdout", "tokenize_file"]
