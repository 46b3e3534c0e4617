"""A 95 % interval for the median of a few benchmark rounds, shared by the scripts' summaries.

Single rounds on two shared cores move with the machine by more than proxies differ, so the
scripts report the median over rounds (of ratios or differences paired with nginx's run of the
same round) and how far it can be trusted: a percentile bootstrap, 4,000 resamples of the rounds
with replacement, from a fixed seed so that the same rounds always print the same interval.
"""

import random
import statistics

_rng = random.Random(7)


def interval(xs):
    """(low, high): the 2.5th and 97.5th percentiles of the resampled medians of `xs`."""
    meds = sorted(statistics.median(_rng.choices(xs, k=len(xs))) for _ in range(4000))
    return meds[int(0.025 * len(meds))], meds[int(0.975 * len(meds)) - 1]
