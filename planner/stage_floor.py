"""Stage splits by their step-time floor: which can beat the search's cutoff, best first.

The stage solver (`stages.py`) picks (n_f, k, n_l) and, with recompute='full', a depth r >= 1
under its memory constraints (integer bytes per layer kind). Every split it can return passes
those same integer checks, and the cost model's step time of that split is at least
  (m - 1) * max_s time_s + sum_s time_s,
where time_s is stage s's layers (the first min(r, size) at their recomputed cost, the rest
at their plain cost), its pipeline sends and the embedding / output layer: the estimate's own
sum, less the data-parallel and optimizer terms (both >= 0). `split_floors` walks every split;
for a split the fastest fitting depth is the smallest one that fits (when recomputing a layer
never costs less time and never holds more bytes than keeping it, checked per instance; else
it gives no floors). A configuration with no split under the cutoff is skipped exactly as
one the solver finds no fitting split for: neither changes the answer; otherwise the stage
solver evaluates the splits in order of their floor (`stages._best_split`).
"""

from __future__ import annotations

import math


KINDS = (False, True)  # dense, MoE


def _prefix(coef: dict, pattern) -> list:
    """Sums of a per-kind coefficient over the first i layers (exact for integer ones)."""
    out = [0]
    for x in pattern:
        out.append(out[-1] + coef.get(bool(x), 0))
    return out


def split_floors(cutoff: float, pattern, pp: int, num_mb: int, full: bool, time_rc: dict,
                 time_pl: dict, head_s: float, tail_s: float, sends_s: float, S: dict,
                 A_rc: dict, A_pl: dict, peak_term: int, first_extra: float,
                 last_extra: float, budget: float) -> list[tuple[float, int, int, int]] | None:
    """Every split that passes the stage solver's memory checks with a step-time floor under
    `cutoff`, as (floor, n_f, k, depth) sorted by floor, depth being the smallest that fits
    (0 without full recompute); its estimate at that depth or deeper is at least the floor.
    None when the floor does not hold: with full recompute a layer kind recomputes faster or
    holds more bytes recomputed than kept (then the smallest depth may not be the fastest).
    Per-kind arguments are dicts {is_moe: value}; integer ones are the solver's own
    coefficients."""
    kinds = [e for e in KINDS if e in time_pl]
    # (Equal times differ in the last bit when the host's launches bound both.)
    if full and any(time_rc[e] < time_pl[e] * (1 - 1e-12) or A_rc[e] > A_pl[e] for e in kinds):
        return None
    L = len(pattern)
    t_pl, t_rc = _prefix(time_pl, pattern), _prefix(time_rc, pattern)
    mem = (_prefix(S, pattern), _prefix(A_rc, pattern), _prefix(A_pl, pattern))
    limit = cutoff / (1 - 1e-12)  # float slack: the estimate sums in another order
    # Every split's stage times sum to the same; only the slowest stage differs.
    work = t_pl[L] + head_s + tail_s + pp * sends_s
    first_max, last_min = _edge_ranges(L, pp, num_mb, full, mem, peak_term, first_extra,
                                       last_extra, budget, t_pl, head_s, tail_s,
                                       _slowest_allowed(limit, work, num_mb, sends_s))
    windows: dict[int, list] = {}  # k -> plain time of layers [i, i + k) for every i
    out = []
    for k in range(0 if pp == 2 else 1, L + 1):
        rest = L - (pp - 2) * k
        if rest < 2 or (pp == 2 and k):
            break
        # n_f + (pp - 2) k is where the last stage starts: at least `last_min`.
        for n_f in range(max(1, last_min - (pp - 2) * k), min(rest - 1, first_max) + 1):
            end = n_f + (pp - 2) * k  # where the last stage starts
            # Cheapest this split can be (every layer plain): skip it if even that is too slow.
            slow = max(head_s + t_pl[n_f], tail_s + t_pl[L] - t_pl[end])
            if k:
                if k not in windows:
                    windows[k] = [t_pl[i + k] - t_pl[i] for i in range(L - k + 1)]
                slow = max(slow, max(windows[k][n_f:end:k]))
            if (num_mb - 1) * (slow + sends_s) + work >= limit:
                continue
            stages = [(0, n_f)] + [(lo, lo + k) for lo in range(n_f, end, k or 1)] + [(end, L)]
            r = _smallest_depth(stages, pp, num_mb, full, mem, peak_term, first_extra,
                                last_extra, budget)
            if r is None:
                continue
            times = []
            for lo, hi in stages:
                mid = lo + min(r, hi - lo)
                times.append(t_rc[mid] - t_rc[lo] + t_pl[hi] - t_pl[mid] + sends_s)
            times[0] += head_s
            times[-1] += tail_s
            floor = (num_mb - 1) * max(times) + sum(times)
            if floor < limit:
                out.append((floor, n_f, k, r))
    out.sort()
    return out


def _slowest_allowed(limit: float, work: float, num_mb: int, sends_s: float) -> float:
    """A bound on the slowest stage's plain time (sends aside) of a split that can pass
    `split_floors`' cheapest-split test, widened past float rounding: above it the test
    fails (the test itself still decides)."""
    if num_mb == 1:
        return math.inf if work < limit else -math.inf
    tau = (limit - work) / (num_mb - 1) - sends_s
    return tau + 1e-9 * abs(tau) + 1e-15


def _edge_ranges(L, pp, num_mb, full, mem, peak_term, first_extra, last_extra, budget, t_pl,
                 head_s, tail_s, tau) -> tuple[int, int]:
    """(most layers the first stage may hold, the first layer the last stage may start at)
    for a split to pass `split_floors`' cheapest-split test (first stage head + layers, last
    stage tail + layers under `tau`) and the memory check of `_smallest_depth` for its first
    and last stage (at the deepest recompute: a stage's bytes grow with its layers). Both
    sides are monotone in the layer count, so they are necessary conditions, not guesses."""
    s_, a_rc, a_pl = mem
    act = a_rc if full else a_pl

    def fits(lo: int, hi: int, inflight: int, extra: float) -> bool:
        return s_[hi] - s_[lo] + peak_term + inflight * (act[hi] - act[lo]) <= int(budget - extra)

    first_max = 0
    inflight0 = min(pp, num_mb)
    while (first_max + 1 < L and head_s + t_pl[first_max + 1] < tau
           and fits(0, first_max + 1, inflight0, first_extra)):
        first_max += 1
    last_min = L
    while (last_min - 1 > 0 and tail_s + t_pl[L] - t_pl[last_min - 1] < tau
           and fits(last_min - 1, L, min(1, num_mb), last_extra)):
        last_min -= 1
    return first_max, last_min


def _smallest_depth(stages, pp, num_mb, full, mem, peak_term, first_extra, last_extra,
                    budget) -> int | None:
    """The smallest recompute depth (0 without full recompute) at which every stage passes
    the solver's memory constraint, or None; a stage's bytes never grow with the depth."""
    s_, a_rc, a_pl = mem
    need = 1 if full else 0
    for s, (lo, hi) in enumerate(stages):
        extra = (first_extra if s == 0 else 0) + (last_extra if s == pp - 1 else 0)
        cap = int(budget - extra)
        inflight = min(pp - s, num_mb)
        static = s_[hi] - s_[lo] + peak_term

        def fits(r):
            mid = lo + min(r, hi - lo)
            return static + inflight * (a_rc[mid] - a_rc[lo] + a_pl[hi] - a_pl[mid]) <= cap

        if not full:
            if not fits(0):
                return None
            continue
        size = hi - lo
        if not fits(size):
            return None  # the deepest recompute does not fit either
        a, b = need, max(need, size)  # the answer for this stage lies in [a, b]
        while a < b:
            mid = (a + b) // 2
            if fits(mid):
                b = mid
            else:
                a = mid + 1
        need = max(need, a)
    return need
