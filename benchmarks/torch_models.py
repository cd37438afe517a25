"""Hand-written torchvision-style ResNet-18 / ResNet-50 for the attribution benchmark, and a
MobileNetV1 and a torchvision-style DenseNet-121 for bench_gradient's PyTorch reference.

No CPU torchvision wheel exists here, so the architecture is written out: same layer
names, shapes and initialisation as torchvision.models.resnet18 / resnet50 (v1.5:
stride on the 3x3 conv of a bottleneck). One difference, on purpose: every ReLU is its
own non-inplace module (torchvision reuses one ``self.relu`` per block), because
Captum's GuidedBackprop hooks ReLU modules and a module reused within one forward
breaks its backward hooks. It computes the same function.

Requires torch (the ``bench`` extra); never imported by the service or its tests.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResNet", "resnet18", "resnet50", "MobileNetV1", "DenseNet", "densenet121", "calibrate_batchnorm",
           "seeded_resnet", "seeded_model"]


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu3 = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, width: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != width * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, width * block.expansion, stride),
                                       nn.BatchNorm2d(width * block.expansion))
        layers = [block(self.inplanes, width, stride, downsample)]
        self.inplanes = width * block.expansion
        layers += [block(self.inplanes, width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al. 2017) with a width multiplier: a 3x3/2 stem, 13 depthwise-
    separable blocks (3x3 depthwise, 1x1 pointwise, each BatchNorm + ReLU6), average pool, FC."""

    BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]

    def __init__(self, width: float = 1.0, num_classes: int = 1000):
        super().__init__()

        def unit(cin: int, cout: int, kernel: int, stride: int, groups: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU6()]

        cin = int(32 * width)
        layers = unit(3, cin, 3, 2, 1)
        for channels, stride in self.BLOCKS:
            cout = int(channels * width)
            layers += unit(cin, cin, 3, stride, cin) + unit(cin, cout, 1, 1, 1)
            cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(bn_size * growth), nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class _DenseBlock(nn.Module):
    def __init__(self, layers: int, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.layers = nn.ModuleList(_DenseLayer(cin + i * growth, growth, bn_size) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))  # torchvision: each layer reads all earlier features
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    """torchvision's DenseNet (Huang et al. 2017): stem, dense blocks joined by transitions
    (BatchNorm, ReLU, 1x1 conv halving the channels, 2x2 average pool), BatchNorm, ReLU, FC."""

    def __init__(self, blocks: tuple[int, ...] = (6, 12, 24, 16), growth: int = 32, stem: int = 64,
                 bn_size: int = 4, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(),
                                   nn.MaxPool2d(3, 2, 1)]
        channels = stem
        for i, n in enumerate(blocks):
            layers.append(_DenseBlock(n, channels, growth, bn_size))
            channels += n * growth
            if i != len(blocks) - 1:
                layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels // 2, 1, bias=False),
                           nn.AvgPool2d(2, 2)]
                channels //= 2
        layers += [nn.BatchNorm2d(channels), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def densenet121(num_classes: int = 1000) -> DenseNet:
    return DenseNet((6, 12, 24, 16), 32, 64, 4, num_classes)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: int = 2, batch_size: int = 8, seed: int = 0) -> None:
    """Set every BatchNorm's running statistics from a few random batches (cumulative average).

    A freshly initialised net in eval mode uses mean 0 / var 1, so activations grow block
    after block and the logits of a 50-layer net end up huge; calibrated statistics keep
    every layer near unit scale, as in a trained net, so the numbers compared are sane."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the calibration batches
    model.train()
    for _ in range(batches):
        model(torch.randn(batch_size, 3, 224, 224, generator=g))
    model.eval()


def seeded_resnet(name: str, seed: int = 0) -> ResNet:
    """``resnet18`` / ``resnet50`` random-initialised with ``seed``, BatchNorm calibrated, in eval mode."""
    if name not in ("resnet18", "resnet50"):
        raise ValueError(f"unknown model {name!r}; allowed: resnet18, resnet50")
    return seeded_model(name, seed)


def seeded_model(name: str, seed: int = 0) -> nn.Module:
    """Any network of this module by name, random-initialised with ``seed``, BatchNorm calibrated,
    in eval mode: resnet18, resnet50, mobilenet_v1_0.75, densenet121."""
    factories = {"resnet18": resnet18, "resnet50": resnet50, "densenet121": densenet121,
                 "mobilenet_v1_0.75": lambda: MobileNetV1(0.75)}
    if name not in factories:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(factories)}")
    torch.manual_seed(seed)
    model = factories[name]()
    calibrate_batchnorm(model, seed=seed)
    return model.eval()
