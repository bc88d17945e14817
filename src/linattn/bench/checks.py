"""Statistics and plausibility checks for benchmark timings (pure functions, no timing).

Every timed cell carries its repeats; :func:`summarize` gives the median and a spread
(interquartile range over the median, or the full range below 4 repeats). A cell is
*flagged* (``row["flags"]``, a list of reasons) when its numbers cannot be trusted:

* ``unstable``: the spread is still above :data:`SPREAD_LIMIT` after the extra repeats;
* ``fwd > fwd+bwd``: the forward pass took longer than forward plus backward of the same
  case, which no implementation can do (a neighbouring load hit one of the two);
* ``steeper than O(L^p)``: between neighbouring lengths the time grew faster than the
  method's complexity allows (``L^1`` for FAVOR+ and Linformer, ``L^2`` for exact
  attention, plus :data:`SLOPE_TOLERANCE`);
* ``ratio collapse``: a speed-up over exact attention fell by more than
  :data:`RATIO_DROP` from one length to the next (a linear method can only gain on a
  quadratic one as L grows).

:func:`flag_speed`, :func:`flag_linformer` and :func:`flag_generation` apply them to the
rows of the three timing suites; :func:`flagged` lists what was flagged.
"""

from __future__ import annotations

import itertools
import math

SPREAD_LIMIT = 0.25  # (q3 - q1) / median above this: re-measure, then flag
SLOPE_TOLERANCE = 0.5  # allowed excess of the log-log slope over the complexity
RATIO_DROP = 2.0  # a speed-up falling by more than this between lengths
EXTRA_ROUNDS = 4  # at most this many extra repeats of an unstable cell
WARN = "⚠"

# Time complexity in L of each timed method (exponent p of O(L^p)).
COMPLEXITY = {
    "exact": 2,
    "materialized": 2,
    "favor": 1,
    "linformer": 1,
    "performer_pytorch": 1,
    "linformer_pkg": 1,
    "linformer_module": 1,
}


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """``(q1, median, q3)`` with linear interpolation (numpy's default)."""
    s = sorted(xs)
    if not s:
        raise ValueError("quartiles of no values")

    def q(p: float) -> float:
        pos = p * (len(s) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return q(0.25), q(0.5), q(0.75)


def spread(xs: list[float]) -> float:
    """Relative spread: ``(q3 - q1) / median`` from 4 repeats on, else
    ``(max - min) / median`` (0 for a single value)."""
    if len(xs) < 2:
        return 0.0
    q1, med, q3 = quartiles(xs)
    if med <= 0:
        return math.inf
    return (q3 - q1) / med if len(xs) >= 4 else (max(xs) - min(xs)) / med


def summarize(xs: list[float]) -> dict:
    """``{median_s, q1_s, q3_s, min_s, max_s, spread, n}`` of repeat times ``xs``."""
    q1, med, q3 = quartiles(xs)
    return {
        "median_s": med,
        "q1_s": q1,
        "q3_s": q3,
        "min_s": min(xs),
        "max_s": max(xs),
        "spread": spread(xs),
        "n": len(xs),
    }


def unstable(times: list[float], limit: float = SPREAD_LIMIT) -> bool:
    """Whether a cell's repeats spread more than ``limit``."""
    return spread(times) > limit


def add_flag(row: dict, reason: str) -> None:
    flags = row.setdefault("flags", [])
    if reason not in flags:
        flags.append(reason)


def _flag_spread(rows: list[dict], limit: float) -> None:
    for r in rows:
        if "spread" in r and r["spread"] > limit:
            add_flag(
                r,
                f"unstable: spread {100 * r['spread']:.0f}% over {r.get('n', '?')} "
                f"repeats (limit {100 * limit:.0f}%)",
            )


def _flag_slopes(
    rows: list[dict],
    key,
    complexity,
    *,
    value: str = "median_s",
    length: str = "length",
    what: str = "time",
    scale: float = 1e3,
    tolerance: float = SLOPE_TOLERANCE,
) -> None:
    """Between neighbouring lengths of the same ``key(row)``, flag the longer cell when
    ``row[value]`` grew faster than ``L^(p + tolerance)``, ``p = complexity(row)``
    (``None``: not checked). Values are printed times ``scale`` as ms."""
    groups: dict = {}
    for r in rows:
        if value in r:
            groups.setdefault(key(r), []).append(r)
    for group in groups.values():
        group.sort(key=lambda r: r[length])
        for a, b in itertools.pairwise(group):
            p = complexity(b)
            if p is None or a[value] <= 0 or b[value] <= 0 or b[length] <= a[length]:
                continue
            slope = math.log(b[value] / a[value]) / math.log(b[length] / a[length])
            if slope > p + tolerance:
                add_flag(
                    b,
                    f"{what} grows as L^{slope:.1f} from {a[length]} "
                    f"({scale * a[value]:.1f} ms) to {b[length]} "
                    f"({scale * b[value]:.1f} ms): steeper than O(L^{p:g})",
                )


def _flag_ratio_drops(
    rows: list[dict],
    key,
    ratio: str,
    *,
    what: str,
    axis: str,
    why: str = "",
    drop: float = RATIO_DROP,
) -> None:
    """Between neighbouring lengths of the same ``key(row)``, flag the longer cell when
    ``row[ratio]`` (a gain over exact attention) fell by more than ``drop``; the reason
    reads ``"{what} fell from 3.00x at {axis}=64 to 1.00x at {axis}=128{why}"``."""
    groups: dict = {}
    for r in rows:
        if ratio in r:
            groups.setdefault(key(r), []).append(r)
    for group in groups.values():
        group.sort(key=lambda r: r["length"])
        for a, b in itertools.pairwise(group):
            if b[ratio] * drop < a[ratio]:
                add_flag(
                    b,
                    f"{what} fell from {a[ratio]:.2f}x at {axis}={a['length']} "
                    f"to {b[ratio]:.2f}x at {axis}={b['length']}{why}",
                )


def _complexity(row: dict) -> int | None:
    return COMPLEXITY.get(row["method"])


def _speed_case(row: dict) -> tuple:
    """The timed case of a speed row, all but its length."""
    return (
        row["method"],
        row.get("causal", False),
        row.get("kernel", "softmax"),
        row.get("window"),
        row["pass"],
    )


def flag_speed(rows: list[dict], limit: float = SPREAD_LIMIT) -> None:
    """Flag the rows of ``linattn bench --suite favor`` (and ``peers``) in place."""
    ok = [r for r in rows if "median_s" in r]
    _flag_spread(ok, limit)
    index = {
        (
            r["method"],
            r.get("causal", False),
            r.get("kernel", "softmax"),
            r.get("window"),
            r["pass"],
            r["length"],
        ): r
        for r in ok
    }
    for (method, causal, kernel, window, p, length), r in index.items():
        if p != "fwd":
            continue
        both = index.get((method, causal, kernel, window, "fwd+bwd", length))
        if both is not None and r["median_s"] > both["median_s"]:
            msg = (
                f"forward ({1e3 * r['median_s']:.1f} ms) slower than forward+backward "
                f"({1e3 * both['median_s']:.1f} ms) at L={length}"
            )
            add_flag(r, msg)
            add_flag(both, msg)
    _flag_slopes(ok, _speed_case, _complexity)
    # Speed-ups over exact attention: a collapse from one length to the next.
    _flag_ratio_drops(
        ok,
        _speed_case,
        "speedup_vs_exact",
        what="speed-up",
        axis="L",
        why=": implausible for linear vs quadratic",
    )


def flag_linformer(rows: list[dict], limit: float = SPREAD_LIMIT) -> None:
    """Flag the rows of the Linformer table in place (forward only)."""
    ok = [r for r in rows if "median_s" in r]
    _flag_spread(ok, limit)
    _flag_slopes(ok, lambda r: (r["method"], r.get("proj_dim")), _complexity)
    _flag_ratio_drops(
        ok, lambda r: r["proj_dim"], "time_saved_vs_exact", what="time saved", axis="n"
    )


def flag_generation(rows: list[dict], limit: float = SPREAD_LIMIT) -> None:
    """Flag per-token generation times in place: FAVOR+'s must not grow with the context
    (O(1) per token, allowed up to ``context^0.5``), exact attention's at most linearly
    (a key/value cache read per token, allowed up to ``context^1.5``)."""
    ok = [r for r in rows if "ms_per_token" in r]
    _flag_spread(ok, limit)
    _flag_slopes(
        ok,
        lambda r: r["attention"],
        lambda r: 0 if r["attention"] == "favor" else 1,
        value="ms_per_token",
        length="context",
        what="time per token",
        scale=1.0,
    )


def flagged(rows: list[dict], label) -> list[tuple[str, str]]:
    """``(cell, reason)`` for every flagged row; ``label(row)`` names the cell."""
    return [(label(r), reason) for r in rows for reason in r.get("flags", [])]
