"""Command-line entries. They sit above everything they call (the trainer, the demo), so no
module below imports them back.

    python -m gendd_fast.train [flags]     ->  train_cli()
    gendd-train [flags]                    ->  train_cli()   (console script)
    python -m gendd_fast.evaluate [flags]  ->  evaluate_cli() (one checkpoint: gendd_fast.evaluate;
                                               several, --table/--csv, --steps-sweep: gendd_fast.report)
"""
from __future__ import annotations

import sys
from typing import List, Optional

from .config import config_from_args
from .models import list_models
from . import signal_policy
from .signal_policy import StopRequested
from .train import train


def train_main(argv: Optional[List[str]] = None):
    """Parse ``argv`` and run: no arguments or ``--demo`` run the digits demo,
    ``--list-models`` prints the zoo, anything else trains."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        return _demo()
    cfg, args = config_from_args(argv)
    if args.list_models:
        print("\n".join(list_models()))
        return None
    if args.demo:
        return _demo()
    return train(cfg)


def _demo():
    """The demo's stages are train() calls; between them (the handoff) a signal stops the demo
    at once instead of killing it or raising KeyboardInterrupt (each train() honours it inside)."""
    from .demo import run_demo
    with signal_policy.installed({"signal": None, "phase": "set-up"}):
        return run_demo()


def train_cli():
    """``train_main`` with the errors a user can fix printed as one line (exit status 2)."""
    try:
        train_main()
    except StopRequested as e:  # the signal policy: a clean stop, not an error
        print(f"gendd_fast: {e}; the checkpoints on disk are whole (writes are atomic): run "
              f"the same command with --resume auto to continue", file=sys.stderr)
        sys.exit(0)
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def evaluate_main(argv: Optional[List[str]] = None):
    """One checkpoint: :func:`gendd_fast.evaluate.main`. Several checkpoints, a table or
    ``--steps-sweep``: :func:`gendd_fast.report.main`."""
    from . import evaluate, report
    if report.wants_report(sys.argv[1:] if argv is None else argv):
        return report.main(argv)
    return evaluate.main(argv)


def evaluate_cli():
    try:
        evaluate_main()
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # nothing is written until the end: stopping loses nothing
        print("gendd_fast: evaluation stopped by SIGINT; nothing was written", file=sys.stderr)
        sys.exit(130)
