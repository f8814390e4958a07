"""Model files: ``calmlm.load`` (both formats, the Hub), native checkpoints, the reference checkpoint adapter, Hub upload."""
