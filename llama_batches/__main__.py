"""`python -m llama_batches`: the same as the `llama-batches` script."""

from llama_batches.cli import main

if __name__ == "__main__":
    main()
