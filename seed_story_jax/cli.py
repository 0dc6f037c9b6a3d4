"""`seed-story`: the one entry point. Thin: parse, then call library functions.

Each subcommand lives in `seed_story_jax/commands/<name>.py` with HELP, add_arguments(parser) and
run(args) -> exit code. Modules import jax lazily inside run(), so `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = (
    "convert", "inspect", "text", "encode", "reconstruct", "init", "generate",
    "data", "train", "plan", "eval", "demo",
)


def _available():
    for name in COMMANDS:
        try:
            yield name, importlib.import_module(f"seed_story_jax.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"seed_story_jax.commands.{name}":
                raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seed-story",
        description="SEED-Story in JAX: convert checkpoints, generate long multimodal stories, train.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, mod in _available():
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from seed_story_jax.errors import USER_ERRORS

    try:
        code = args._run(args)
    except USER_ERRORS as e:
        print(f"seed-story {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"seed-story {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
