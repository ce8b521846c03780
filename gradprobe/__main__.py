"""`python -m gradprobe`, and so `torchrun --nproc-per-node N -m gradprobe scan ...`."""

from gradprobe.cli import main

if __name__ == "__main__":
    main()
