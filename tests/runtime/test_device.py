"""Which GPU a rank takes and how many ranks share it: pure arithmetic, tested without a GPU."""
import pytest
import torch

from fedmpi.engine.batched import GPU_MEMORY_SHARE, gpu_chunk_budget
from fedmpi.runtime.device import ranks_on_device, ranks_on_gpu


@pytest.mark.parametrize("local_size,gpus,sharing", [
    (4, 1, [4, 4, 4, 4]),        # four ranks on one GPU
    (4, 2, [2, 2, 2, 2]),        # cuda:0 gets ranks 0 and 2, cuda:1 ranks 1 and 3
    (3, 2, [2, 1, 2]),           # cuda:0 gets ranks 0 and 2, cuda:1 rank 1 alone
    (2, 4, [1, 1]),              # more GPUs than ranks
    (8, 3, [3, 3, 2, 3, 3, 2, 3, 3]),
])
def test_ranks_sharing_a_gpu_follow_the_local_rank_modulo_mapping(local_size, gpus, sharing):
    assert [ranks_on_gpu(r, local_size, gpus) for r in range(local_size)] == sharing
    # Every rank is counted once on its own GPU: the shares of one GPU's ranks add up to one.
    assert sum(1 / s for s in sharing) == pytest.approx(min(gpus, local_size))


def test_the_cpu_is_never_shared_for_the_chunk_budget():
    assert ranks_on_device(torch.device("cpu"), 3, 4) == 1


@pytest.mark.parametrize("local_size,gpus", [(4, 1), (3, 2), (8, 3)])
def test_the_ranks_on_one_gpu_take_at_most_the_share_of_its_free_memory_together(local_size, gpus):
    free = 80 << 30
    for device in range(gpus):
        ranks = [r for r in range(local_size) if r % gpus == device]
        total = sum(gpu_chunk_budget(free, ranks_on_gpu(r, local_size, gpus)) for r in ranks)
        assert total == pytest.approx(GPU_MEMORY_SHARE * free)
    assert gpu_chunk_budget(free, 1) == GPU_MEMORY_SHARE * free
