"""The peer benchmark's parts (tools/bench_peers.py) and its drivers for pfl-research and Flower."""
