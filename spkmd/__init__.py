"""spkmd: a batched PyTorch molecular-dynamics engine on spkserve force providers."""

__version__ = "0.1.0"
