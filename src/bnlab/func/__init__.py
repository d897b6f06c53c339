"""Models as pure functions for ``torch.func`` (vmap, grad, jacrev, jvp), running statistics
included: docs/func.md."""

from bnlab.func.stateless import StatelessFn, stateless

__all__ = ["StatelessFn", "stateless"]
