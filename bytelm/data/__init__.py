"""Byte data pipeline: sources -> prepared shards -> batches.

`prepare()` itself is not re-exported here: it would shadow the `bytelm.data.prepare`
module. Import it as `from bytelm.data.prepare import prepare`.
"""

from bytelm.data.dataset import PreparedCorpus, iter_eval_windows, sample_batch
from bytelm.data.prepare import DOC_SEP, FORMAT_VERSION, ensure_prepared, read_meta
from bytelm.data.sources import DataError, iter_documents, source_fingerprint

__all__ = [
    "DOC_SEP",
    "FORMAT_VERSION",
    "DataError",
    "PreparedCorpus",
    "ensure_prepared",
    "iter_documents",
    "iter_eval_windows",
    "read_meta",
    "sample_batch",
    "source_fingerprint",
]
