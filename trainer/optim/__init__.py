"""Optimizers over adapter parameters; the Riemannian preconditioner is a gradient transform beside them."""

from trainer.optim.factory import build_optimizer, build_scheduler
from trainer.optim.riemannian import RiemannianPreconditioner

__all__ = ["RiemannianPreconditioner", "build_optimizer", "build_scheduler"]
