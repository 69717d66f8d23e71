"""DeepSpec: train, evaluate and compare speculative-decoding drafters against a target LLM, losslessly."""

__version__ = "0.1.0"
