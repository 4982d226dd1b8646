"""`python -m vigorl_cli ...` (and `torchrun -m vigorl_cli ...`) runs the CLI."""

from vigorl_cli.cli.main import main

if __name__ == "__main__":
    main()
