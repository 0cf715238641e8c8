"""What the flush's hold can reach in hubspot_burst's scenario B (a simulation, no I/O).

    python -m bench.drain_policy [--seeds 5] [--bursts 4 5 6 9 13]

Scenario B: 2,500 learners with 2 events each, uniform over a burst of a few seconds (how
long the receiver took to accept them: 9 s on a fast 2-core machine, 13-15 s on a slow
one); 10 requests per rolling 10 s (2 spent on start-up checks just before); batches of
100; the first flush 1 s after the first event. The flush's rule (``engine.flush.batch_wait``): the
oldest dirty contacts go first; a partial batch waits until its oldest has been dirty for
the 1 s window; a full batch goes at once, unless the budget binds (more contacts dirty
than the free requests can carry), when it waits until its newest contact has been dirty
for ``hold`` s (``FLUSH_HOLD_SECONDS``; 0: no hold). A contact that changes after it was
sent is sent again. The bound the benchmark compares with (25 upserts greedily from the
first event, 20 s) needs to know which contacts are final; a learner's next event is
equally likely at any time of the burst.
"""

from __future__ import annotations

import argparse
import random

LEARNERS, LIMIT, WINDOW, BATCH, STEP, BOUND, FLUSH_WINDOW = 2500, 10, 10.0, 100, 0.05, 20.0, 1.0
HOLDS = (0.0, 2.0, 3.0, 4.0, 5.0, 7.0)


def drain(hold: float, seed: int, burst: float = 9.0) -> tuple[int, float]:
    """(upserts, time of the last one) for one shuffled burst of ``burst`` seconds."""
    rng = random.Random(seed)
    arrivals = sorted((rng.uniform(0, burst), learner) for learner in range(LEARNERS) for _ in "ab")
    dirty: dict[int, float] = {}  # learner -> when it became dirty
    requests, upserts, now, last, next_arrival = [-1.0, -1.0], 0, FLUSH_WINDOW, 0.0, 0
    while next_arrival < len(arrivals) or dirty:
        while next_arrival < len(arrivals) and arrivals[next_arrival][0] <= now:
            at, learner = arrivals[next_arrival]
            next_arrival += 1
            dirty.setdefault(learner, at)
        free = LIMIT - sum(1 for t in requests if t > now - WINDOW)
        if free > 0 and dirty:
            batch = sorted(dirty.items(), key=lambda item: item[1])[:BATCH]
            if len(batch) < BATCH:
                ready = now - batch[0][1] >= FLUSH_WINDOW
            else:
                binds = len(dirty) > free * BATCH
                ready = not binds or now - batch[-1][1] >= hold
            if ready:
                for learner, _ in batch:
                    del dirty[learner]
                requests.append(now)
                upserts, last = upserts + 1, now
        now += STEP
    return upserts, last


def main(argv: list[str] | None = None) -> int:
    """Print upserts and drain per burst length and hold, averaged over seeds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--bursts", type=float, nargs="+", default=[4.0, 5.0, 6.0, 9.0, 13.0])
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
