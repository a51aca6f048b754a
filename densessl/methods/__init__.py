"""Lightning pretraining tasks (thin: the maths lives in losses/, the models in models/)."""

from densessl.methods.dense_pretraining import DensePretraining
from densessl.methods.monitors import PairThroughputMonitor, collapse_stats

__all__ = ["DensePretraining", "PairThroughputMonitor", "collapse_stats"]
