"""The method's settings: the backbone, DenseCL's hyper-parameters and the matching strategy (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from densecl.typed_settings import check, check_positive, result

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
MAX_REGIONS = 16


class Matching(StrEnum):
    """How each query cell finds its positive key cell (DenseCL Table 6; `backbone` is the paper's)."""

    backbone = "backbone"  # argmax of backbone-feature similarity
    projection = "projection"  # argmax of the projected dense vectors' similarity
    random = "random"  # a random key cell: a lower bound
    geometric = "geometric"  # the cell the crop geometry says shows the same image point


class ModelName(StrEnum):
    densecl = "densecl"
    mocov2 = "mocov2"  # DenseCL with λ = 0: exactly MoCo v2
    random_init = "random_init"  # no pre-training: downstream stages start from random weights


@dataclass
class BackboneConfig:
    arch: str = result("resnet50")

    def validate(self) -> None:
        check(self.arch in ARCHS, "arch", self.arch, f"allowed: {', '.join(ARCHS)}")


@dataclass
class ModelConfig:
    """DenseCL's own hyper-parameters."""

    name: ModelName = result(ModelName.densecl)
    loss_lambda: float = result(0.5)  # L = (1 - λ) L_global + λ L_dense
    lambda_warmup_iters: int = result(0)  # λ = 0 for the first N iterations (Table 5's 1.0* row)
    num_regions: int | None = result(None)  # S: the dense grid is pooled to S x S; None = the backbone's own grid
    feat_dim: int = result(128)
    temperature: float = result(0.2)
    momentum: float = result(0.999)  # of the key encoder

    def validate(self) -> None:
        check(0.0 <= self.loss_lambda <= 1.0, "loss_lambda", self.loss_lambda,
              "allowed: a value in [0, 1] (0 = MoCo v2)")
        check(self.name != ModelName.mocov2 or self.loss_lambda == 0.0, "loss_lambda", self.loss_lambda,
              "model=mocov2 is DenseCL with lambda = 0")
        check(self.lambda_warmup_iters >= 0, "lambda_warmup_iters", self.lambda_warmup_iters,
              "allowed: an integer >= 0")
        check(self.num_regions is None or 1 <= self.num_regions <= MAX_REGIONS, "num_regions", self.num_regions,
              f"allowed: null (native grid) or 1..{MAX_REGIONS}")
        check_positive(self, "feat_dim")
        check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "allowed: a value in [0, 1)")
        check(self.temperature > 0, "temperature", self.temperature, "allowed: a value > 0")


@dataclass
class MatchingConfig:
    name: Matching = result(Matching.backbone)

    def validate(self) -> None:
        check(self.name in tuple(Matching), "name", self.name, f"allowed: {', '.join(Matching)}")
