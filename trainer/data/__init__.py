"""Batches from the builder's shards: which samples each rank reads in which order (sampling),
the loaders for unpacked samples (loader) and for packed 30 s windows (packing)."""
