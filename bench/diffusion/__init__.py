"""A small pixel-space text-to-image setting for DreamBooth-style benchmarks.

Everything here is made from Fashion-MNIST alone (no pretrained diffusion weights, no
model hub): a class-conditional denoiser pre-trained by ``pretrain``, a fidelity encoder
trained by ``encoder``, subjects drawn from the test split by ``subjects``, and the loaders
in ``assets`` that the benchmark uses. ``tokens`` holds the prompt vocabulary.
"""
