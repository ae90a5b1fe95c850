"""DenseCL in one builder: query/key encoders, two queues, matching and the two InfoNCE losses.

With loss_lambda = 0 it is MoCo v2 exactly (the dense head and dense queue are then not built).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from densecl.distributed import concat_all_gather, shuffle_batch, unshuffle_batch
from densecl.method.backbone import ResNetTrunk
from densecl.method.heads import DenseHead, GlobalHead, pool_to_regions
from densecl.method.losses import dense_info_nce, info_nce
from densecl.method.matching import (
    argmax_match,
    chance_correspondence_accuracy,
    correspondence_accuracy,
    geometric_match,
    random_match,
)
from densecl.method.settings import Matching
from densecl.method.split_bn import convert_split_batchnorm


class Encoder(nn.Module):
    """Backbone + global head (+ dense head). Returns (global embedding, SxS backbone grid, dense grid)."""

    def __init__(self, arch: str, feat_dim: int, num_regions: int | None, dense: bool):
        super().__init__()
        self.backbone = ResNetTrunk(arch)
        channels = self.backbone.out_channels
        self.global_head = GlobalHead(channels, feat_dim)
        self.dense_head = DenseHead(channels, feat_dim) if dense else None
        self.num_regions = num_regions

    def forward(self, images: torch.Tensor):
        c5 = self.backbone(images)
        grid = pool_to_regions(c5, self.num_regions)
        dense = self.dense_head(grid) if self.dense_head is not None else None
        return self.global_head(c5), grid, dense


class DenseCL(nn.Module):
    def __init__(
        self,
        arch: str = "resnet50",
        feat_dim: int = 128,
        num_regions: int | None = None,
        queue_len: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.2,
        loss_lambda: float = 0.5,
        matching: str = "backbone",
        dense_head: bool | None = None,
        bn_splits: int = 1,
    ):
        super().__init__()
        self.arch = arch
        self.num_regions = num_regions
        self.queue_len = queue_len
        self.momentum = momentum
        self.temperature = temperature
        self.loss_lambda = loss_lambda
        self.matching = Matching(matching)
        self.dense = loss_lambda > 0 if dense_head is None else dense_head

        self.encoder_q = Encoder(arch, feat_dim, num_regions, self.dense)
        self.bn_splits = bn_splits
        if bn_splits > 1:
            convert_split_batchnorm(self.encoder_q, bn_splits)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self._query_runner = None  # a DDP wrapper of encoder_q, set by the engine; not a submodule
        self.shuffle_bn = True  # acts under DDP or with bn_splits > 1; the engine turns it off with SyncBN

        self.register_buffer("queue_global", F.normalize(torch.randn(feat_dim, queue_len), dim=0))
        self.register_buffer("queue_global_ptr", torch.zeros((), dtype=torch.long))
        if self.dense:
            self.register_buffer("queue_dense", F.normalize(torch.randn(feat_dim, queue_len), dim=0))
            self.register_buffer("queue_dense_ptr", torch.zeros((), dtype=torch.long))

    def set_query_runner(self, runner: nn.Module | None) -> None:
        """Run the query encoder through `runner` (DDP) while keeping state-dict keys unwrapped."""
        object.__setattr__(self, "_query_runner", runner)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q, parameters only (BN statistics are the key's own)."""
        q_params = [p.detach() for p in self.encoder_q.parameters()]
        k_params = list(self.encoder_k.parameters())
        torch._foreach_lerp_(k_params, q_params, 1.0 - self.momentum)  # = m * k + (1 - m) * q, one pass

    @torch.no_grad()
    def _enqueue(self, queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
        keys = concat_all_gather(keys)
        batch = keys.shape[0]  # the queue length is a multiple of it (PretrainConfig.validate)
        start = int(ptr)
        queue[:, start : start + batch] = keys.T.to(queue.dtype)
        ptr.fill_((start + batch) % self.queue_len)

    @torch.no_grad()
    def extract_dense(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised SxS backbone features of the query encoder, (N, C, S, S): what matching sees."""
        return F.normalize(pool_to_regions(self.encoder_q.backbone(images), self.num_regions).float(), dim=1)

    def forward(
        self,
        im_q: torch.Tensor,
        im_k: torch.Tensor,
        boxes: torch.Tensor | None = None,
        flips: torch.Tensor | None = None,
        loss_lambda: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """im_q / im_k: the two views (N, 3, H, W); boxes (N, 2, 4) and flips (N, 2) describe both crops
        (needed for geometric matching and correspondence accuracy). Returns the losses and statistics."""
        lam = self.loss_lambda if loss_lambda is None else loss_lambda
        runner = self._query_runner if self._query_runner is not None else self.encoder_q
        q, q_grid, q_dense = runner(im_q)
        q = F.normalize(q.float(), dim=1)

        with torch.no_grad():
            self.momentum_update()
            local = self.bn_splits > 1
            im_k, unshuffle = shuffle_batch(im_k, local) if self.shuffle_bn else (im_k, None)
            k, k_grid, k_dense = (
                unshuffle_batch(t, unshuffle) if t is not None else None for t in self.encoder_k(im_k)
            )
            k = F.normalize(k.float(), dim=1)

        loss_global = info_nce(q, k, self.queue_global, self.temperature)
        out = {"loss_global": loss_global.detach()}
        num_regions = q_grid.shape[-1]
        chosen = None
        if self.matching in ("backbone", "geometric", "random") or self.dense:
            chosen = self._match(q_grid, k_grid, q_dense, k_dense, boxes, flips, num_regions)
        if self.dense:
            r = F.normalize(q_dense.float().flatten(2), dim=1)
            with torch.no_grad():
                t = F.normalize(k_dense.float().flatten(2), dim=1)
                t_pos = torch.gather(t, 2, chosen.unsqueeze(1).expand(-1, t.shape[1], -1))
                k2 = F.normalize(k_dense.float().mean(dim=(2, 3)), dim=1)  # pooled, then normalised
            loss_dense = dense_info_nce(r, t_pos, self.queue_dense, self.temperature)
            loss = (1.0 - lam) * loss_global + lam * loss_dense
            out["loss_dense"] = loss_dense.detach()
        else:
            loss = loss_global
        out["loss"] = loss
        if chosen is not None and boxes is not None and flips is not None:
            geo, inside = geometric_match(boxes[:, 0], flips[:, 0], boxes[:, 1], flips[:, 1], num_regions)
            out["corr_acc"] = correspondence_accuracy(chosen, geo, inside, num_regions)
            out["corr_acc_chance"] = chance_correspondence_accuracy(geo, inside, num_regions)

        self._enqueue(self.queue_global, self.queue_global_ptr, k)
        if self.dense:
            self._enqueue(self.queue_dense, self.queue_dense_ptr, k2)
        return out

    @torch.no_grad()
    def _match(self, q_grid, k_grid, q_dense, k_dense, boxes, flips, num_regions) -> torch.Tensor:
        batch, cells = q_grid.shape[0], num_regions * num_regions
        if self.matching == "backbone":
            return argmax_match(
                F.normalize(q_grid.float().flatten(2), dim=1), F.normalize(k_grid.float().flatten(2), dim=1)
            )
        if self.matching == "projection":
            return argmax_match(
                F.normalize(q_dense.float().flatten(2), dim=1), F.normalize(k_dense.float().flatten(2), dim=1)
            )
        if self.matching == "random":
            return random_match(batch, cells, q_grid.device)
        if boxes is None or flips is None:
            raise ValueError("matching='geometric' needs the views' crop boxes and flips")
        return geometric_match(boxes[:, 0], flips[:, 0], boxes[:, 1], flips[:, 1], num_regions)[0]
