"""The book's PyTorch run through bertlite (all GPUs under DataParallel, else the CPU).

    python examples/pretrain_torch.py                  # WikiText-2 (downloaded if absent)
    python examples/pretrain_torch.py --corpus sample  # the corpus shipped with bertlite
"""

from book_run import main

main("torch", devices_help="cpu, cuda, cuda:0,1 (default: all GPUs, else the CPU)")
