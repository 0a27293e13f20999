"""`langadapt` command line: one sub-command group per area; adaptation commands live in `cli.adaptation`, the
service's in `cli.service`, the remote ones (`jobs`, `results`: a running service through the client) in
`cli.remote`, which is dispatched before anything imports training code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from langadapt.cli import remote

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="langadapt", description="Language adaptation of LLMs: vocabularies, embedding init, LEP."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from langadapt.cli import adaptation, service

    adaptation.register(commands)
    service.register(commands)
    remote.register(commands)
    return parser


def _quiet_libraries() -> None:
    """Keep stderr for our own one-line errors: no progress bars or advisory warnings from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in remote.COMMANDS:
        return remote.main(argv)
    from langadapt.core.adaptation.errors import AdaptationInputError
    from langadapt.core.adaptation.spec import describe_validation_error

    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except AdaptationInputError as exc:
        print(f"langadapt: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ValidationError as exc:  # settings given on the command line that a stage configuration refuses
        print(f"langadapt: error: {describe_validation_error(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
