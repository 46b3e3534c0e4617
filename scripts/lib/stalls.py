"""Where an open loop's slow answers came from: scripts/bench-stalls.sh's analysis of one run.

Inputs: the generator's samples (examples/open_loop.rs with OPEN_LOOP_SAMPLES: the run's start on
CLOCK_MONOTONIC, then `due_us latency_us` per answered request), a system-wide `perf record -k
CLOCK_MONOTONIC -e sched:sched_switch -e sched:sched_wakeup` of the same run, and which thread
ids belong to the proxy's workers, to its other threads (Tollgate's pipeline: the event
publisher, the log, the collector, the store, the query API), to the upstream and to the kernel.

A *stall* is a stretch of the schedule where answers were slow one after another: requests of
SLOW_US or more whose scheduled times lie within GAP_US of the previous slow one, at least
MIN_SLOW of them. For each stall the core time of its window (from 1 ms before its first slow
request was due to when its last slow answer came) is split by who ran: the proxy, the
upstream, the generator, kernel threads, other processes (the machine's own agents, perf) and
nobody (idle). Beside it, the share of the stalls' time in which a core was idle while a thread
that could run waited for the other one (woken or preempted, not yet back on a core), with the
same share over the whole run for comparison: threads queued on one core while the other idles
(the scheduler's placement) rather than work that needs more than two cores.

Two kinds of event belong to the machine rather than to any party of the benchmark:
- a *silent gap*: no scheduler event on any core for over 1 ms. The generator's timer fires
  every 0.5 ms and wakes it, so a running guest has events at least that often; a gap is a
  guest that was not running at all (its virtual cores held by the host).
- a *machine stretch*: a thread that is neither a party nor working for one (a kernel thread
  other than the network's `ksoftirqd` and the I/O's `kworker`s, or another process) holding a
  core for over 1 ms in one go. On a kernel without preemption (`PREEMPT_NONE`) a kernel
  thread such as DAMON's `kdamond` keeps its core until it yields, and whatever is queued on
  that core waits with it.
Answers in flight during either are counted, and the p99 of the others is printed beside the
whole run's: a diagnostic of how much of the tail is the machine's, not a figure to quote as
the proxy's (what piles up behind such an event drains after it, and that is not taken out).

Prints one Markdown table row (see HEADER).
"""

import bisect
import collections
import re
import subprocess
import sys

SLOW_US = 1000
GAP_US = 2000
MIN_SLOW = 10
MACHINE_US = 1000
PARTIES = (
    "proxy",
    "proxy's other threads",
    "upstream",
    "generator",
    "kernel threads",
    "other processes",
    "idle",
)
HEADER = (
    "| target | p99 ms | answers ≥ 1 ms | of them in stalls | stalls' cores: proxy's workers /"
    " its other threads / upstream / generator / kernel threads / other processes / idle, % | a core idle while a thread waited"
    " for another, % of the stalls' time (of the whole run) | busiest others in stalls |"
    " silent gaps > 1 ms: n, ms | machine stretches > 1 ms: n, ms | answers in flight during"
    " either | p99 of the rest, ms |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)

SWITCH = re.compile(
    r"\[(\d+)\]\s+([\d.]+):\s+sched:sched_switch:.*?prev_pid=(\d+) .*?prev_state=(\S+)"
    r" ==> next_comm=(.*?) next_pid=(\d+)"
)
WAKEUP = re.compile(r"sched:sched_wakeup:.*? pid=(\d+) .*?target_cpu=(\d+)")


def load_samples(path):
    with open(path) as f:
        head = f.readline().split()
        assert head[0] == "start_monotonic_us", f"{path}: not an OPEN_LOOP_SAMPLES file"
        start = int(head[1])
        rows = [tuple(map(int, line.split())) for line in f if line.strip()]
    return start, rows


def stalls(rows):
    """[first_due, last_due, end, slow] per stall, from (due, latency) rows in due order."""
    found = []
    for due, lat in rows:
        if lat < SLOW_US:
            continue
        if found and due - found[-1][1] <= GAP_US:
            s = found[-1]
            s[1], s[2], s[3] = due, max(s[2], due + lat), s[3] + 1
        else:
            found.append([due, due, due + lat, 1])
    return [s for s in found if s[3] >= MIN_SLOW]


def quantile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    return sorted_values[max(0, -(-len(sorted_values) * q // 100) - 1)]


def idle_beside_waiting(idle, waiting):
    """The spans in which some core was idle while a thread that could run waited for another
    core: `idle` and `waiting` map a core to its (start, end) intervals."""
    marks = sorted(
        (t, kind, cpu, step)
        for kind, spans_of in enumerate((idle, waiting))
        for cpu, spans in spans_of.items()
        for a, b in spans
        for t, step in ((a, 1), (b, -1))
    )
    count = collections.Counter()
    spans, since = [], None
    for t, kind, cpu, step in marks:
        idle_cores = {c for (k, c), n in count.items() if k == 0 and n > 0}
        waiting_cores = {c for (k, c), n in count.items() if k == 1 and n > 0}
        if since is not None and t > since and idle_cores and waiting_cores - idle_cores:
            spans.append((since, t))
        count[(kind, cpu)] += step
        since = t
    return spans


def overlap(spans, lo, hi):
    """Microseconds of [lo, hi) that `spans` cover (spans do not overlap each other)."""
    return sum(max(0, min(b, hi) - max(a, lo)) for a, b in spans)


def main():
    samples, sched, proxy_tids, other_tids, upstream_tids, kernel_tids, target = sys.argv[1:8]
    party_of = {}
    for tids, party in (
        (proxy_tids, "proxy"),
        (other_tids, "proxy's other threads"),
        (upstream_tids, "upstream"),
        (kernel_tids, "kernel threads"),
    ):
        for tid in open(tids).read().split():
            party_of[int(tid)] = party
    start, rows = load_samples(samples)
    found = stalls(rows)
    end = rows[-1][0] + rows[-1][1] if rows else 0

    def party(tid, comm):
        if tid == 0:
            return "idle"
        if tid in party_of:
            return party_of[tid]
        if comm == "open_loop":
            return "generator"
        if comm.startswith("tollgate"):
            return "proxy's other threads"
        return "other processes"

    def machine(tid, comm):
        p = party(tid, comm)
        if p == "kernel threads":
            return not comm.startswith(("ksoftirqd", "kworker"))
        return p == "other processes"

    script = subprocess.run(
        ["perf", "script", "-i", sched, "-F", "cpu,time,event,trace"],
        capture_output=True, text=True, check=True,
    ).stdout
    # Per core, (start_us, tid, comm) of each stretch, and (start_us, end_us) of each wait of a
    # thread that could run (from its wake-up, or from being preempted, to its next switch-in);
    # every event's time, for silent gaps.
    stretches = collections.defaultdict(list)
    waiting = collections.defaultdict(list)
    waits_from = {}
    events = []
    for line in script.splitlines():
        m = SWITCH.search(line)
        t = line.split("]", 1)[-1].split(":", 1)[0].strip()
        try:
            t = int(float(t) * 1e6) - start
        except ValueError:
            continue
        events.append(t)
        if m:
            cpu, prev, nxt = int(m.group(1)), int(m.group(3)), int(m.group(6))
            stretches[cpu].append((t, nxt, m.group(5)))
            if nxt in waits_from:
                on, since = waits_from.pop(nxt)
                waiting[on].append((since, t))
            if prev != 0 and m.group(4).startswith("R"):
                waits_from[prev] = (cpu, t)
            continue
        w = WAKEUP.search(line)
        if w and int(w.group(1)) not in waits_from:
            waits_from[int(w.group(1))] = (int(w.group(2)), t)
    events.sort()
    silent = [(a, b) for a, b in zip(events, events[1:]) if b - a > 1000 and 0 < a and b < end]
    held = [
        (t0, t1)
        for seq in stretches.values()
        for (t0, tid, comm), (t1, _, _) in zip(seq, seq[1:])
        if t1 - t0 > MACHINE_US and machine(tid, comm)
    ]
    windows = sorted(silent + held)
    starts = [a for a, _ in windows]
    reach = []  # the latest end among windows[:i + 1]
    for _, b in windows:
        reach.append(max(b, reach[-1]) if reach else b)

    def during_machine_event(due, lat):
        i = bisect.bisect_left(starts, due + lat) - 1
        return i >= 0 and reach[i] > due

    share = collections.Counter()
    others = collections.Counter()
    for a, _, stall_end, _ in found:
        lo, hi = a - 1000, stall_end
        for seq in stretches.values():
            for (t0, tid, comm), (t1, _, _) in zip(seq, seq[1:]):
                d = min(t1, hi) - max(t0, lo)
                if d > 0:
                    p = party(tid, comm)
                    share[p] += d
                    if p in ("kernel threads", "other processes"):
                        others[re.sub(r"[-/:]?\d+$", "", comm)] += d
    total = sum(share.values()) or 1
    idle = {cpu: [(t0, t1) for (t0, tid, _), (t1, _, _) in zip(seq, seq[1:]) if tid == 0]
            for cpu, seq in stretches.items()}
    spans = idle_beside_waiting(idle, waiting)
    lopsided = sum(overlap(spans, a - 1000, e) for a, _, e, _ in found)
    lopsided_run = overlap(spans, 0, end) / (end or 1)
    stall_time = sum(e - a + 1000 for a, _, e, _ in found) or 1
    slow = sum(1 for _, l in rows if l >= SLOW_US)
    hit = [during_machine_event(d, l) for d, l in rows]
    rest = sorted(l for (_, l), h in zip(rows, hit) if not h)
    split = " / ".join(f"{100 * share[p] / total:.0f}" for p in PARTIES)
    busiest = ", ".join(f"{c} {100 * d / total:.0f} %" for c, d in others.most_common(3)) or "none"
    print(
        f"| {target} | {quantile(sorted(l for _, l in rows), 99) / 1000:.3f} | {slow} of {len(rows)} |"
        f" {sum(s[3] for s in found)} in {len(found)} | {split} | {100 * lopsided / stall_time:.0f} (whole run {100 * lopsided_run:.0f}) |"
        f" {busiest} |"
        f" {len(silent)}, {sum(b - a for a, b in silent) / 1000:.1f} |"
        f" {len(held)}, {sum(b - a for a, b in held) / 1000:.1f} |"
        f" {sum(hit)}, {sum(1 for (_, l), h in zip(rows, hit) if h and l >= SLOW_US)} of them ≥ 1 ms |"
        f" {quantile(rest, 99) / 1000:.3f} |"
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["--header"]:
        print(HEADER)
    else:
        main()
