"""Examples that build on the moetrace reader (they may need extra packages, e.g. PyTorch)."""
