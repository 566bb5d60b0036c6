"""ResNet with bottleneck blocks, keeping its residual DAG.

Configs: `50` (ResNet-50 at 224x224, the default), `test` (one bottleneck per stage, 32x32).
Overrides: `batch=N`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lamc.models.spec import Dim, ModelSpec, override_int, parse_config, reject_leftovers, seeded


@dataclass(frozen=True)
class ResNetConfig:
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64
    image_size: int = 224
    num_classes: int = 1000


CONFIGS = {
    "50": ResNetConfig(),
    "101": ResNetConfig(layers=(3, 4, 23, 3)),
    "test": ResNetConfig(layers=(1, 1, 1, 1), width=8, image_size=32, num_classes=10),
}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.inplanes = cfg.width
        self.conv1 = nn.Conv2d(3, cfg.width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(cfg.width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(cfg.width, cfg.layers[0], 1)
        self.layer2 = self._make_layer(cfg.width * 2, cfg.layers[1], 2)
        self.layer3 = self._make_layer(cfg.width * 4, cfg.layers[2], 2)
        self.layer4 = self._make_layer(cfg.width * 8, cfg.layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cfg.width * 8 * Bottleneck.expansion, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                # Non-trivial statistics, so that folding mistakes would show in validation.
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.1, 0.1)
                if m.running_mean is not None and m.running_var is not None:
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                # Small residual branches, as in trained networks (torchvision's
                # zero_init_residual, but not zero): activations keep their scale through
                # 16 blocks instead of growing with each residual sum.
                nn.init.uniform_(m.bn3.weight, 0.0, 0.2)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False
                ),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(pixel_values))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build(config: str | None = None) -> ModelSpec:
    base, overrides = parse_config(config, CONFIGS, "50")
    batch = override_int(overrides, "batch", 1)
    reject_leftovers(overrides)
    cfg = CONFIGS[base]
    gen = seeded(0)
    with torch.no_grad():
        model = ResNet(cfg).eval()
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=gen)
    return ModelSpec(
        module=model,
        example_inputs={"pixel_values": pixels},
        dynamic={"pixel_values": {0: Dim("batch", 1, 64)}},
        output_names=["logits"],
        name=f"resnet-{base}",
        operating_point={"batch": batch},
    )
