"""Offline half: timm classifier + labelled images -> ProtoNMF artifact (may import torch)."""
