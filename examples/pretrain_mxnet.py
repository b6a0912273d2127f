"""The book's MXNet run through bertlite, on every device it finds (one shard per device).

    python examples/pretrain_mxnet.py                  # WikiText-2 (downloaded if absent)
    python examples/pretrain_mxnet.py --corpus sample  # the corpus shipped with bertlite
    python examples/pretrain_mxnet.py --devices cpu:0,cpu:1   # the per-shard path on a CPU
"""

from book_run import main

main("mxnet", devices_help="cpu, gpu:0,1, cpu:0,cpu:1 (default: all GPUs, else the CPU)")
