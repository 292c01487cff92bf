"""FedProx's gradient term, by hand and against autograd of the proximal loss."""
import torch

from fedmpi.engine.prox import add_proximal_


def test_proximal_gradient_by_hand():
    # mu 0.5: g + 0.5 (w - w0) = [1, 1] + 0.5 [3 - 1, -1 - 1] = [2, 0]
    grads, params, anchor = [torch.tensor([1.0, 1.0])], [torch.tensor([3.0, -1.0])], [torch.tensor([1.0, 1.0])]
    add_proximal_(grads, params, anchor, mu=0.5)
    assert grads[0].tolist() == [2.0, 0.0]
    add_proximal_(grads, params, anchor, mu=0.0)
    assert grads[0].tolist() == [2.0, 0.0]


def test_matches_autograd_of_loss_plus_mu_half_squared_distance():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    params = list(model.parameters())
    anchor = [p.detach() + torch.randn_like(p) for p in params]
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = list(torch.autograd.grad(loss, params))
    add_proximal_(grads, params, anchor, mu=0.3)
    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
    want = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y) + 0.3 / 2 * prox, params)
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(grads, want))
