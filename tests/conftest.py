import os

import torch

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The test models are tiny: one thread is faster than two, and steadier when other processes share the cores.
torch.set_num_threads(1)
