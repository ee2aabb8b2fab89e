"""The stacked engine: jobs of one group trained as one model with a leading job dimension.

``grouping`` (which jobs may share a stack), ``footprint`` (what one job takes in a stack),
``stack`` (the stacked tensors and their ragged sample layout), ``kernels`` (losses and
gradients; ``ops``: the MLP kernel's operations; ``func_kernel`` for any model through
``torch.func``; ``batching``: how its operations run batched), ``optimizers`` (one class per
torch optimizer), ``run`` (the training run), ``memory`` (how many jobs a device holds at
once), ``graphs`` (COMPILE: the step as a CUDA graph).
"""
