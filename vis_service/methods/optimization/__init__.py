"""Optimization loops over the model input: activation maximization, class models, feature inversion.

Per step: one onnxruntime run of a cached forward+backward graph (the model plus
small objective "heads", `objectives.py`), then cheap numpy: transform adjoints
(`transforms.py`), regularizer gradients (`regularizers.py`), the
parameterization's chain rule (`parameterization.py`) and the update
(`optimizers.py`). The loops live in `activation_maximization.py` and `inversion.py`.
"""
from .activation_maximization import MaximizeSettings, maximize
from .inversion import InvertSettings, invert

__all__ = ["MaximizeSettings", "maximize", "InvertSettings", "invert"]
