"""`python -m tcsm_kernels` / `tcsm`: command line entry point."""
import sys


def main(argv=None) -> int:
    from .train.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
