r"""Command line: ``python -m captum_tracin_we {demo,toy} [options]``."""

import sys
from typing import Optional, Sequence

COMMANDS = {
    "demo": "fine-tune MiniLM on movie reviews and explain predictions (a few minutes)",
    "toy": "train a tiny bag-of-words model and explain two sentences (seconds, offline)",
}


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m captum_tracin_we COMMAND [options]\n\ncommands:")
        for name, help_text in COMMANDS.items():
            print(f"  {name:8s} {help_text}")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    if argv[0] == "demo":
        from captum_tracin_we.demo import main as command
    else:
        from captum_tracin_we.toy import main as command
    command(argv[1:])


if __name__ == "__main__":
    main()
