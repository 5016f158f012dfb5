"""Test doubles that ship with the package: third-party architectures at random init, wrapped as users wrap them.

`lightning_opt.testing.zoo` needs the ``zoo`` extra (``pip install "lightning-opt[zoo]"``: timm, transformers).
"""
