"""upcycle: Drop-Upcycling of dense decoder checkpoints into sparse Mixture-of-Experts models, and their training."""

__version__ = "0.1.0"

from upcycle.errors import UpcycleError  # noqa: E402

__all__ = ["UpcycleError", "__version__"]
