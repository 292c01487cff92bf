"""fedmpi: federated averaging as an MPI job, from HDF5 shards, with per-round communication cost."""
__version__ = "0.1.0"
