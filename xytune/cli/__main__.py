"""`python -m xytune.cli`: the same commands as the `xytune` script."""

from . import main

if __name__ == "__main__":
    main()
