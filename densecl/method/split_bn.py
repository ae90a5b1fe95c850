"""Split BatchNorm: BN statistics over G sub-batches of one process's batch, so that a single process (a CPU
run, one GPU) reproduces the paper's per-GPU BN groups and shuffle-BN can work without DDP.

Why it matters: with one BN group, the query and its positive key are normalised with statistics of the
same images, and MoCo-style training can lower its loss through that leak (the "BN cheat" of the MoCo paper)
instead of learning features. The key batch is shuffled before the key encoder, so a key and its query
fall into different groups. The state-dict keys are BatchNorm2d's, so exported weights are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises each of `num_splits` contiguous sub-batches with its own
    statistics; the running statistics move by the mean of the sub-batches' updates. Evaluation is plain BN."""

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"num_splits={num_splits}: expected a positive number of BN groups")
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        if x.shape[0] % self.num_splits != 0:
            raise ValueError(f"a batch of {x.shape[0]} does not split into bn_splits={self.num_splits} equal BN groups")
        momentum = 0.1 if self.momentum is None else self.momentum
        chunks = x.chunk(self.num_splits)
        if self.running_mean is None:  # track_running_stats=False: nothing to update
            return torch.cat([F.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps) for c in chunks])
        outs, means, variances = [], [], []
        for chunk in chunks:
            mean, var = self.running_mean.clone(), self.running_var.clone()
            outs.append(F.batch_norm(chunk, mean, var, self.weight, self.bias, True, momentum, self.eps))
            means.append(mean)
            variances.append(var)
        with torch.no_grad():
            self.running_mean.copy_(torch.stack(means).mean(0))
            self.running_var.copy_(torch.stack(variances).mean(0))
            self.num_batches_tracked.add_(1)
        return torch.cat(outs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in `module` (in place, parameters and buffers kept) by SplitBatchNorm2d."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm2d(
                child.num_features,
                num_splits,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            split.load_state_dict(child.state_dict())
            floating = [t for t in child.state_dict().values() if t.is_floating_point()]
            if floating:  # keep the layer's device and dtype (a BN without affine or statistics has none)
                split.to(device=floating[0].device, dtype=floating[0].dtype)
            setattr(module, name, split)
        else:
            convert_split_batchnorm(child, num_splits)
    return module
