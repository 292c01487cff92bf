#!/usr/bin/env bash
# Every GPU number of the README's Performance section in one short run (about 10 minutes on an H100, more
# the first time pfl-research's environment is made),
# for a session with a lent GPU (the `device` tool) or any CUDA node of a cluster:
#   bash tools/gpu_check.sh [OUT_DIR]
# Needs the package installed (pip install -e ".[mpich]") and MNIST in $FEDMPI_DATA (IDX gzip files).
# Writes gpu.txt, bench.txt (tutorial loop vs engines on the GPU, bf16 autocast beside fp32, the
# pinned-memory aggregation vs a raw Allreduce), nodes1000.txt (1,000 tutorial-sized nodes on one GPU) and
# peers.txt + peers.json (tools/bench_peers.py on the GPU: fedmpi's lines and pfl-research's, the 2nn and the
# CNN; pfl's environment is made on first use and needs the network once, else only fedmpi's lines run).
set -euo pipefail
out=${1:-${OUT:-/tmp/fedmpi-gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
python tools/bench_nodes.py --device cuda --nodes 1000 --epochs 10 | tee "$out/nodes1000.txt"
python tools/bench.py --device cuda --bf16 --rounds 3 --work "$out" 2>&1 | tee "$out/bench.txt"
python tools/bench_peers.py --device cuda --peers pfl --models 2nn,cnn --rounds 3 --cnn-rounds 3 \
    --pfl-layouts 1x1,2x1 --work "$out/peers" --json "$out/peers.json" 2>&1 | tee "$out/peers.txt"
