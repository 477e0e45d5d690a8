"""Model code that ships inside every saved graft.

The files here import only torch, transformers, timm and each other (same-folder relative
imports), because ``save_pretrained`` copies them next to the weights: a repository saved by
hf-graft then loads as remote code where hf-graft is not installed.
"""
