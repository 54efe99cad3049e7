"""Reference models in plain torch: MLP, ResNet, ViT, a nanoGPT-style GPT (also built
from ``nn.TransformerEncoderLayer``) and a GIN."""

from .gin import GIN
from .gpt import GPT
from .mlp import MLP
from .resnet import ResNet
from .torch_gpt import TorchGPT
from .vit import ViT

__all__ = ["GIN", "GPT", "MLP", "ResNet", "TorchGPT", "ViT"]
