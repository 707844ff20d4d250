"""The network as timm's formulas: configs, layers, the NF blocks and net, feature extraction."""
