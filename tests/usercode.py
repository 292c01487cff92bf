"""A user's model and loss module, as a test copies it into a run's working folder: good and bad code."""
USER_CODE = '''
import torch
from torch import nn
import torch.nn.functional as F


def small(input_shape, classes, width=8):
    n = 1
    for d in input_shape:
        n *= d
    return nn.Sequential(nn.Flatten(), nn.Linear(n, width), nn.ReLU(), nn.Linear(width, classes))


def smoothed(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none", label_smoothing=0.1)


def squared(outputs, targets):
    return ((outputs.softmax(1) - torch.zeros_like(outputs).scatter(1, targets[:, None], 1.0)) ** 2).sum(1)


def raises(input_shape, classes):
    raise RuntimeError("no weights for you")


def returns_int(input_shape, classes):
    return 3


def no_params(input_shape, classes):
    return nn.Flatten()


def wrong_outputs(input_shape, classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 3))


def double(input_shape, classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, classes)).double()


def forward_fails(input_shape, classes):
    return nn.Sequential(nn.Linear(5, classes))


def batchnorm(input_shape, classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.BatchNorm1d(8), nn.Linear(8, classes))


def batchnorm_cumulative(input_shape, classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.BatchNorm1d(8, momentum=None), nn.Linear(8, classes))


def dropout2d(input_shape, classes):
    return nn.Sequential(nn.Dropout2d(0.5), nn.Flatten(), nn.Linear(784, classes))


def dropout(input_shape, classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.Dropout(0.5), nn.Linear(8, classes))


not_callable = 5


def loss_scalar(outputs, targets):
    return F.cross_entropy(outputs, targets)


def loss_raises(outputs, targets):
    raise ValueError("no loss today")


def loss_not_vmappable(outputs, targets):
    return ((outputs.softmax(1) - F.one_hot(targets, outputs.shape[1]).float()) ** 2).sum(1)


def loss_nan(outputs, targets):
    return outputs.sum(1) * float("nan")


from fedmpi.fl.server import ServerOptimizer


class Velocity(ServerOptimizer):
    STATE_NAMES = ("velocity",)

    def direction(self, d):
        v = self._buffer("velocity", d)
        return v.mul_(0.9).add_(d)


class NotAnOptimizer:
    def __init__(self, lr):
        self.lr = lr


class BadInit(ServerOptimizer):
    def __init__(self, lr):
        raise RuntimeError("no server today")
'''


def write_user_code(folder, name="usercode"):
    """usercode.py (and broken.py, which raises on import) in `folder`; returns the folder."""
    (folder / f"{name}.py").write_text(USER_CODE)
    (folder / "broken.py").write_text("import torch\nraise ZeroDivisionError('broken on import')\n")
    return folder
