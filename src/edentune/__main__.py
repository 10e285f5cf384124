"""`python -m edentune …`: what `accelerate launch -m edentune train CONFIG` runs in each process."""

from edentune.cli import main

if __name__ == "__main__":
    main()
