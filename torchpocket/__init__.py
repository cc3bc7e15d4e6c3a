"""torchpocket: automated model compression for PyTorch (PocketFlow / AMC style).

``torchpocket.compress(model, train_loader, val_loader, learner=..., hpo=..., target=...)`` searches and
compresses a model; ``torchpocket.load(path)`` rebuilds a compressed model from its ``model.pt``.
"""

from __future__ import annotations

from torchpocket.api import Front, compress, load, pick

__version__ = "0.1.0"

__all__ = ["Front", "__version__", "compress", "load", "pick"]
