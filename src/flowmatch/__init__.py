"""flowmatch: flow matching and flow-map generative models in PyTorch."""

__version__ = "0.1.0"
