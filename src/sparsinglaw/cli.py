"""Command line: thin wrappers that parse options, call the library and print a summary.

Every user error surfaces as one line on stderr and exit status 2 (see `main`).
"""

from __future__ import annotations

import sys

import typer

from sparsinglaw.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Activation sparsity of LLMs: measure, train, track, fit (arXiv 2411.02335).")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning user errors into one clear line and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click usage errors and out-of-memory get one line too
        import click

        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(2)
        if type(e).__name__ in ("OutOfMemoryError",) or "out of memory" in str(e).lower():
            print("error: out of memory; lower --batch-size (or --seq-len) and try again", file=sys.stderr)
            sys.exit(3)
        raise


if __name__ == "__main__":
    main()
