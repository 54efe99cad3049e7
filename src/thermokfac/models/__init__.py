"""Reference models in plain torch: MLP, ResNet, ViT, a nanoGPT-style GPT and a GIN."""

from .gin import GIN
from .gpt import GPT
from .mlp import MLP
from .resnet import ResNet
from .vit import ViT

__all__ = ["GIN", "GPT", "MLP", "ResNet", "ViT"]
