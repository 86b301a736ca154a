"""HCFormer: clustering as attention (Suzuki 2022), and the pipeline that reproduces the paper."""

__version__ = "0.1.0"
