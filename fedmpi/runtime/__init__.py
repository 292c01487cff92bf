"""The job around the math: MPI, devices, signals, faults, checkpoints."""
