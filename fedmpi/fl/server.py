"""Server optimizers on the averaged update (FedOpt, Reddi et al. 2021), pure torch: no MPI here.

After the Allreduce every rank holds the same averaged update d = mean_k w_k (theta_k - main)
and calls `step(main, d)` with the same state, so the main models stay identical without any
further message. d points downhill (it is minus a pseudo-gradient), hence `main + ...` below.
State is kept in float64 on the main model's device; the main model stays in its own dtype and is updated in place.
"""
from __future__ import annotations

from typing import Optional

import torch


class ServerOptimizer:
    """`none`: plain FedAvg, main + server_lr * d (server_lr 1: the averaged model itself)."""

    STATE_NAMES: tuple[str, ...] = ()  # the state tensors after the first step (a checkpoint must hold them all)

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = lr
        self._state: dict[str, torch.Tensor] = {}

    def step(self, main: torch.Tensor, update: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Move `main` in place along this round's averaged update, scale * `update` (the
        all-reduced sum and 1 / total weight: the division rides along in the same pass); returns it.

        In place because the old main model has no reader left once a round's updates are summed,
        and a fresh [P] tensor per round costs an allocation as large as the Allreduce's own work.
        """
        if main.shape != update.shape:
            raise ValueError(f"main has shape {tuple(main.shape)}, update {tuple(update.shape)}")
        update = update.to(main.device)
        if type(self) is ServerOptimizer:  # plain FedAvg: one pass in the model's dtype, no state
            return main.add_(update.to(main.dtype), alpha=self.lr * scale)
        return main.copy_(main.double() + self.lr * self.direction(update.double() * scale))

    def direction(self, d: torch.Tensor) -> torch.Tensor:
        return d

    def state(self) -> dict[str, torch.Tensor]:
        """The optimizer's tensors, for a checkpoint (empty before the first step)."""
        return dict(self._state)

    def load_state(self, state: dict[str, torch.Tensor], device: torch.device,
                   dtype: torch.dtype = torch.float64) -> None:
        """Continue from `state` (a checkpoint's, read on the CPU), kept on `device`, the main model's."""
        self._state = {k: v.to(device=device, dtype=dtype, copy=True) for k, v in state.items()}

    def _buffer(self, name: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """A state tensor, created at the first step when the parameter count becomes known."""
        if name not in self._state:
            self._state[name] = torch.full_like(like, fill)
        return self._state[name]


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al. 2019): v = momentum v + d; main += server_lr v."""

    STATE_NAMES = ("momentum",)

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(lr)
        self.momentum = momentum

    def direction(self, d: torch.Tensor) -> torch.Tensor:
        v = self._buffer("momentum", d)
        return v.mul_(self.momentum).add_(d)


class FedAdam(ServerOptimizer):
    """Reddi et al. 2021, Algorithm 2: m = b1 m + (1-b1) d; v from `second_moment`; main += lr m / (sqrt(v) + tau).

    As in the paper there is no bias correction, m starts at 0 and v at tau^2 (v_{-1} >= tau^2).
    """

    STATE_NAMES = ("m", "v")

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau

    def direction(self, d: torch.Tensor) -> torch.Tensor:
        m = self._buffer("m", d).mul_(self.beta1).add_(d, alpha=1 - self.beta1)
        v = self._buffer("v", d, fill=self.tau ** 2)
        self.second_moment(v, d * d)
        return m / (v.sqrt() + self.tau)

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        """Adam: v = b2 v + (1-b2) d^2 (in place)."""
        v.mul_(self.beta2).add_(d2, alpha=1 - self.beta2)


class FedYogi(FedAdam):
    """FedAdam with Yogi's additive second moment, which grows or shrinks v by at most (1-b2) d^2."""

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        """Yogi: v = v - (1-b2) d^2 sign(v - d^2) (in place)."""
        v.sub_((1 - self.beta2) * d2 * torch.sign(v - d2))


def make_server_optimizer(name: str, lr: Optional[float] = None, momentum: float = 0.9, beta1: float = 0.9,
                          beta2: float = 0.99, tau: float = 1e-3) -> ServerOptimizer:
    """The server optimizer called `name` (none, fedavgm, fedadam, fedyogi); lr None: 1 or 0.01 (adaptive)."""
    if name in ("none", "fedavgm"):
        lr = 1.0 if lr is None else lr
        return ServerOptimizer(lr) if name == "none" else FedAvgM(lr, momentum)
    if name in ("fedadam", "fedyogi"):
        kind = FedAdam if name == "fedadam" else FedYogi
        return kind(0.01 if lr is None else lr, beta1, beta2, tau)
    raise ValueError(f"unknown server optimizer {name!r}: none, fedavgm, fedadam or fedyogi")


INTERFACE = ("step", "state", "load_state")


def from_config(cfg) -> ServerOptimizer:
    """The server optimizer a Config asks for (server_opt and the server_* keys), or a user's class named by
    an import path, called with lr=server_lr; one ConfigError naming the key when it is not one."""
    if cfg.server_opt not in ("none", "fedavgm", "fedadam", "fedyogi"):
        return user_server_optimizer(cfg.server_opt, cfg.server_lr)
    return make_server_optimizer(cfg.server_opt, cfg.server_lr, cfg.server_momentum, cfg.server_beta1,
                                 cfg.server_beta2, cfg.server_tau)


def user_server_optimizer(path: str, lr: float) -> ServerOptimizer:
    """An instance of the class at import path `path`, checked for the ServerOptimizer interface."""
    from ..errors import ConfigError
    from ..plugins import describe, load

    where = f"config key 'server_opt' {path!r}"
    try:
        opt = load("server_opt", path)(lr=lr)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - user code: whatever it raises is one line
        raise ConfigError(f"{where}: creating it with lr={lr} raised {describe(err)}") from None
    missing = [name for name in INTERFACE if not callable(getattr(opt, name, None))]
    names = getattr(opt, "STATE_NAMES", None)
    if missing or not isinstance(names, tuple) or not all(isinstance(n, str) and n.isidentifier() for n in names):
        lack = f"no method {', '.join(missing)}" if missing else "STATE_NAMES is not a tuple of names"
        raise ConfigError(f"{where} is not a server optimizer ({lack}): subclass fedmpi.fl.server.ServerOptimizer")
    return opt
