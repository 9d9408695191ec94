"""Batch normalization (Ioffe & Szegedy, 2015), forward and backward, training and evaluation.

Per channel c, over the M = N*H*W values of that channel in the batch (N or N*L in 1-d):

    training:   mu = mean(x), var = mean((x - mu)^2)           (biased: what normalizes)
                running_mean <- (1 - m) running_mean + m mu
                running_var  <- (1 - m) running_var + m var * M / (M - 1)   (unbiased)
    evaluation: mu, var = running_mean, running_var
    both:       x_hat = (x - mu) / sqrt(var + eps),  y = gamma x_hat + beta

Backward: dbeta = sum(dout), dgamma = sum(dout * x_hat) over the M values. In
evaluation mu and var are constants, so dx = dout * gamma / sqrt(var + eps).
In training mu and var depend on every x of the channel, and the chain rule
through them (docs/backprop.md) gives

    dx = gamma / sqrt(var + eps) * (dout - mean(dout) - x_hat * mean(dout * x_hat))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cnnlab.backprop.layer import Layer
from cnnlab.errors import CnnlabError


class BatchNorm(Layer):
    """Shared by BatchNorm1d and BatchNorm2d, which differ only in the input shapes they take.

    gamma ("weight"), beta ("bias"): (C,), absent when affine=False.
    Buffers running_mean, running_var: (C,) and num_batches_tracked: () int64, absent when
    track_running_stats=False (then batch statistics are used in evaluation too).
    momentum None means a cumulative average: m = 1 / num_batches_tracked.
    reduce: None, or in a data-parallel job with --sync-bn the sum over the processes of a
    vector (cnnlab.train.distributed): the batch statistics, and the sums of the backward
    pass, are then the whole global batch's.
    """

    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    input_dims: tuple[int, ...] = ()
    input_shapes = ""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        gamma: torch.Tensor | None = None,
        beta: torch.Tensor | None = None,
        running_mean: torch.Tensor | None = None,
        running_var: torch.Tensor | None = None,
        num_batches_tracked: torch.Tensor | None = None,
        path: str = "",
    ) -> None:
        super().__init__(path)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        if gamma is not None and beta is not None:
            self.params["weight"], self.params["bias"] = gamma, beta
        if running_mean is not None and running_var is not None and num_batches_tracked is not None:
            self.buffers["running_mean"] = running_mean
            self.buffers["running_var"] = running_var
            self.buffers["num_batches_tracked"] = num_batches_tracked

    @classmethod
    def from_torch(cls, module: nn.modules.batchnorm._BatchNorm, path: str) -> BatchNorm:
        def plain(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.detach() if t is not None else None

        return cls(module.num_features, module.eps, module.momentum, plain(module.weight), plain(module.bias),
                   module.running_mean, module.running_var, module.num_batches_tracked, path)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, ...) -> y of the same shape."""
        c = self.num_features
        self._check_input(x, x.dim() in self.input_dims and x.shape[1] == c, self.input_shapes.format(c=c))
        dims = (0, *range(2, x.dim()))  # every dimension but the channel's
        per_channel = (1, c) + (1,) * (x.dim() - 2)  # (1, C, 1, 1) in 2-d: broadcasts over N, H, W
        use_batch_stats = self.training or not self.buffers
        m = x.numel() // c  # values per channel
        if use_batch_stats:
            if m < 2:
                raise CnnlabError(f"{self} needs more than one value per channel in training, got {tuple(x.shape)}")
            if self.reduce is None:
                var, mu = torch.var_mean(x, dim=dims, correction=0)
            else:  # over every process's shard: the mean first, then the squares about it (as var_mean)
                totals = self.reduce(torch.cat([x.sum(dims), x.new_full((1,), m)]))  # (C + 1,): sums, count
                m = int(totals[-1].item())
                mu = totals[:c] / m
                var = self.reduce(((x - mu.view(per_channel)) ** 2).sum(dims)) / m
            if self.training and self.buffers:
                self._update_running_stats(mu, var * (m / (m - 1)))
        else:
            mu, var = self.buffers["running_mean"], self.buffers["running_var"]
        inv_std = torch.rsqrt(var + self.eps)  # (C,)
        x_hat = (x - mu.view(per_channel)) * inv_std.view(per_channel)
        y = x_hat
        if self.params:
            # addcmul: beta + gamma * x_hat in one pass over the activations.
            y = torch.addcmul(self.params["bias"].view(per_channel), x_hat, self.params["weight"].view(per_channel))
        self._save(y.shape, x_hat, inv_std, use_batch_stats, dims, per_channel, m)
        return y

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        """dout: (N, C, ...) -> dx of the same shape; fills dgamma, dbeta: (C,)."""
        x_hat, inv_std, used_batch_stats, dims, per_channel, m = self._take(dout)
        dbeta = dout.sum(dims)
        dgamma = (dout * x_hat).sum(dims)
        if self.params:
            self.grads["weight"], self.grads["bias"] = dgamma, dbeta
            scale = self.params["weight"] * inv_std  # gamma / sqrt(var + eps), (C,)
        else:
            scale = inv_std
        if not used_batch_stats:
            return dout * scale.view(per_channel)
        if self.reduce is not None:  # the chain rule through the global batch's mean and variance
            dbeta, dgamma = self.reduce(torch.cat([dbeta, dgamma])).split(self.num_features)
        dx = dout - (dbeta / m).view(per_channel) - x_hat * (dgamma / m).view(per_channel)
        return dx.mul_(scale.view(per_channel))

    def _update_running_stats(self, mu: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """In place, so that the nn.Module sharing these buffers sees the update."""
        count = self.buffers["num_batches_tracked"]
        count.add_(1)
        m = self.momentum if self.momentum is not None else 1.0 / float(count)
        self.buffers["running_mean"].mul_(1 - m).add_(mu, alpha=m)
        self.buffers["running_var"].mul_(1 - m).add_(unbiased_var, alpha=m)


class BatchNorm1d(BatchNorm):
    """Batch norm over features: x: (N, C) or (N, C, L)."""

    input_dims = (2, 3)
    input_shapes = "(N, {c}) or (N, {c}, L)"


class BatchNorm2d(BatchNorm):
    """Batch norm over feature maps: x: (N, C, H, W), statistics over N, H and W."""

    input_dims = (4,)
    input_shapes = "(N, {c}, H, W)"
