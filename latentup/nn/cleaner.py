"""A blind restorer of worn low-res pictures (JPEG wear, grain, pixel blocks), run before the upscale.

    y_c = clamp(y + shuffle(f(unshuffle(y))), 0, 1)

``unshuffle`` folds each 2x2 cell into channels (3 -> 12 at half resolution: the 3x3 convolutions then see 4x the
area for the same cost), f is ``depth`` 3x3 convolutions of ``width`` channels with ReLUs between them, and the
output is a residual: the cleaner only has to learn the wear, and an input without wear stays (nearly) itself.
Receptive field: 2 (2 * depth + 1) + 1 px of the picture (8 x 64: 35 px, four JPEG blocks).
"""

from dataclasses import asdict, dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class CleanerConfig:
    width: int = 64
    depth: int = 8   # convolutions, first and last included (>= 2)


class Cleaner(nn.Module):
    def __init__(self, config: CleanerConfig = CleanerConfig()):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = [nn.Conv2d(12, config.width, 3, padding=1)]
        for _ in range(config.depth - 2):
            layers += [nn.ReLU(inplace=True), nn.Conv2d(config.width, config.width, 3, padding=1)]
        layers += [nn.ReLU(inplace=True), nn.Conv2d(config.width, 12, 3, padding=1)]
        self.body = nn.Sequential(*layers)
        for conv in layers[:-1:2]:  # He initialisation (the default one let ReLUs die under the wear's gradients)
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(layers[-1].weight)  # starts as the identity
        nn.init.zeros_(layers[-1].bias)

    def forward(self, pictures: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> the cleaned [B, 3, H, W]; odd sides are padded by replication and cut back."""
        height, width = pictures.shape[-2:]
        x = F.pad(pictures, (0, width % 2, 0, height % 2), mode="replicate")
        x = x + F.pixel_shuffle(self.body(F.pixel_unshuffle(x, 2)), 2)
        return x[..., :height, :width].clamp(0, 1)

    def config_dict(self) -> dict:
        return asdict(self.config)
