"""The progress line's ETA counts the steps that will actually run, at the measured rate."""
import io
import math

from gendd_fast.logs import Progress


def test_eta_counts_remaining_steps_from_where_this_process_started():
    p = Progress(total_steps=100, start_step=40, enabled=True, stream=io.StringIO())
    p.t0 = 1000.0
    # 10 steps done since the (resumed) start, in 5 s: 0.5 s/step, 50 steps left -> 25 s
    assert math.isclose(p.eta(50, now=1005.0), 25.0)
    # the first update must not claim 0:00:00 while steps remain
    assert p.eta(41, now=1000.5) > 0


def test_eta_is_unknown_before_any_step_and_zero_at_the_end():
    p = Progress(total_steps=30, start_step=0, enabled=True, stream=io.StringIO())
    p.t0 = 0.0
    assert math.isnan(p.eta(0, now=1.0))
    assert p.eta(30, now=3.0) == 0.0


def test_progress_line_shows_a_nonzero_eta_on_the_first_update():
    out = io.StringIO()
    p = Progress(total_steps=1000, start_step=0, enabled=True, stream=out)
    p.t0 -= 2.0  # two seconds for the first 20 steps
    p.update(0, 5, 20, 200, 20, {"loss": 1.0}, 1e-3, 64.0)
    assert "eta 0:00:00" not in out.getvalue() and "eta 0:01:38" in out.getvalue()
