"""The method: DenseCL and its MoCo v2 baseline as one model, with its backbone, heads, losses and matching."""
