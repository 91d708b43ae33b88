"""How and where resnet-ray runs: cluster configs, images, runtime env and their small helpers."""
