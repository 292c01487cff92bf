import torch

from fedmpi.engine.models import build_model
from fedmpi.engine.params import flatten, load_flat, views
from fedmpi.engine.sequential import batch_generator, sgd_epochs


def data(n=45, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_sgd_epochs_matches_torch_optim_sgd_with_the_same_batches():
    x, y = data()
    ours = build_model("2nn", (1, 28, 28), 10, seed=1)
    ref = build_model("2nn", (1, 28, 28), 10, seed=1)
    bufs = views(torch.zeros(sum(p.numel() for p in ours.parameters())), list(ours.parameters()))
    sgd_epochs(ours, bufs, x, y, epochs=3, batch_size=8, lr=0.05, momentum=0.9, gen=batch_generator(0, 4, 1))
    # Reference: torch.optim.SGD over the same shuffles, last batch short (45 = 5 x 8 + 5).
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    gen = batch_generator(0, 4, 1)
    for _ in range(3):
        order = torch.randperm(45, generator=gen)
        for batch in order.split(8):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ref(x[batch]), y[batch]).backward()
            opt.step()
    assert torch.allclose(flatten(list(ours.parameters())), flatten(list(ref.parameters())), rtol=1e-5, atol=1e-6)


def test_batch_order_depends_on_seed_node_and_round():
    draw = lambda *key: torch.randperm(100, generator=batch_generator(*key))  # noqa: E731
    assert torch.equal(draw(0, 3, 2), draw(0, 3, 2))
    assert not torch.equal(draw(0, 3, 2), draw(0, 4, 2))
    assert not torch.equal(draw(0, 3, 2), draw(0, 3, 3))
    assert not torch.equal(draw(0, 3, 2), draw(1, 3, 2))


def test_load_flat_copies_instead_of_aliasing():
    model = build_model("2nn", (1, 28, 28), 10, seed=0)
    params = list(model.parameters())
    flat = torch.arange(sum(p.numel() for p in params), dtype=torch.float32)
    load_flat(params, flat)
    flat.zero_()
    assert params[0].flatten()[5].item() == 5.0
    assert torch.equal(flatten(params), torch.arange(flat.numel(), dtype=torch.float32))
