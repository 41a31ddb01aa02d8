"""PyTorch PtychoPINN reconstructor for Ptychodus.

Layers (imports flow one way): ``engine`` (torch, numpy, Lightning; no Ptychodus, no Qt)
-> ``host`` (Ptychodus adapter) -> ``gui`` (Qt). Importing this package is cheap: nothing
heavy is imported here.
"""

__version__ = "0.1.0"
