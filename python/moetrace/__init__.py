"""moetrace: read Switch Transformer routing trace stores (docs/TRACE_FORMAT.md) with numpy.

    import moetrace
    store = moetrace.open_store("routing_data/store")
    s = store.sample(0)
    s.layer("enc.1").expert          # int32 [S]
    store.column("enc.1.expert")     # all tokens of all shards, memory-mapped

moetrace.torch (TraceDataset) needs PyTorch; moetrace.compat writes the seed system's pickles.
"""

from .errors import StoreError
from .store import (FORMAT, FORMAT_VERSIONS, LAYER_FIELDS, ColumnView, LayerView, Sample, Shard,
                    TraceStore, open_store, softmax)

__version__ = "0.1.0"

__all__ = ["StoreError", "open_store", "TraceStore", "Shard", "Sample", "LayerView", "ColumnView",
           "softmax", "FORMAT", "FORMAT_VERSIONS", "LAYER_FIELDS", "__version__"]
