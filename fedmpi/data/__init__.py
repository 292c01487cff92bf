"""Data: raw sources, partitions, the prepare step, the HDF5 shard file and its validation."""
