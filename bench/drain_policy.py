"""What an online flush policy can reach in hubspot_burst's scenario B (a simulation, no I/O).

    python -m bench.drain_policy [--seeds 5] [--bursts 5 9 13]

Scenario B: 2,500 learners with 2 events each, uniform over a burst of a few seconds (how
long the receiver took to accept them: 9 s on a fast 2-core machine, 13 s on a slow one);
10 requests per rolling 10 s (2 spent on start-up checks just before); batches of 100. A
contact is sent when a request slot is free, oldest dirty first; a contact changed after
it was sent is sent again. Policies differ in how long a contact must have been dirty
before it may go while the budget binds and events keep coming (``hold``; 1 s, the flush
window, otherwise and in production; a large hold means "wait for the burst to end"). The
bound the benchmark compares with (25 upserts greedily from the first event, 20 s) needs to
know which contacts are final; a learner's next event is equally likely at any time of the
burst, so holding contacts longer trades resends for unused request slots.
"""

from __future__ import annotations

import argparse
import random

LEARNERS, LIMIT, WINDOW, BATCH, STEP, BOUND = 2500, 10, 10.0, 100, 0.05, 20.0
HOLDS = (1.0, 3.0, 5.0, 7.0, 9.0, 30.0)


def drain(hold: float, seed: int, burst: float = 9.0) -> tuple[int, float]:
    """(upserts, time of the last one) for one shuffled burst of ``burst`` seconds."""
    rng = random.Random(seed)
    arrivals = sorted((rng.uniform(0, burst), learner) for learner in range(LEARNERS) for _ in "ab")
    seen: dict[int, int] = {}
    sent: dict[int, int] = {}
    dirty: dict[int, float] = {}  # learner -> when it became dirty
    requests, upserts, now, last, next_arrival, latest = [-1.0, -1.0], 0, 0.0, 0.0, 0, 0.0
    while next_arrival < len(arrivals) or dirty:
        while next_arrival < len(arrivals) and arrivals[next_arrival][0] <= now:
            at, learner = arrivals[next_arrival]
            next_arrival += 1
            seen[learner] = seen.get(learner, 0) + 1
            dirty.setdefault(learner, at)
            latest = at
        free = LIMIT - sum(1 for t in requests if t > now - WINDOW)
        if free > 0 and dirty:
            holding = len(dirty) > free * BATCH and now - latest < 1.0  # binds, events coming
            ripe = sorted((t, u) for u, t in dirty.items() if now - t >= (hold if holding else 1.0))
            if len(ripe) >= BATCH or (ripe and not holding):
                for _, learner in ripe[:BATCH]:
                    sent[learner] = seen[learner]
                    del dirty[learner]
                requests.append(now)
                upserts, last = upserts + 1, now
        now += STEP
    return upserts, last


def main(argv: list[str] | None = None) -> int:
    """Print upserts and drain per burst length and hold, averaged over seeds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--bursts", type=float, nargs="+", default=[5.0, 9.0, 13.0])
    args = parser.parse_args(argv)
    head = f"{'burst s':>7} {'hold s':>7} {'upserts':>8} {'drain s':>8} {'ratio':>6}"
    print(f"{head}  (bound {BOUND:.0f} s)")
    for burst in args.bursts:
        for hold in HOLDS:
            runs = [drain(hold, seed, burst) for seed in range(args.seeds)]
            upserts = sum(u for u, _ in runs) / len(runs)
            seconds = sum(t for _, t in runs) / len(runs)
            print(f"{burst:7.0f} {hold:7.0f} {upserts:8.1f} {seconds:8.1f} {seconds / BOUND:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
