"""Fused kernels (Triton, each with a torch path of the same semantics); installed as `deepspec.kernels`."""

from deepspec.kernels.soft_loss import reference_losses, soft_target_losses, triton_usable

__all__ = ["reference_losses", "soft_target_losses", "triton_usable"]
