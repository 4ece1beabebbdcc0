"""One-line notices on stderr, the package's single voice for fallbacks and progress."""
import sys

_said = set()


def notice(msg: str, once: bool = False):
    """Print ``gendd_fast: msg`` to stderr; with ``once``, only the first time it is said."""
    if once:
        if msg in _said:
            return
        _said.add(msg)
    print(f"gendd_fast: {msg}", file=sys.stderr, flush=True)
