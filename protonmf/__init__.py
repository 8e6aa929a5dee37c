"""ProtoNMF Serve: exact, interpretable prototype models from timm classifiers."""

__version__ = "0.1.0"
