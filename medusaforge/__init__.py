"""medusaforge: train, verify and export Medusa speculative-decoding heads."""

__version__ = "0.1.0"
