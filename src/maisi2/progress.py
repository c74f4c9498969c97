"""Progress of long loops (decoding, encoding): one callback convention and a terminal bar for it.

A `Progress` is called as ``progress(done, total)`` after each unit of work, with ``done``
increasing strictly and the last call at ``done == total``; the unit is the caller's to name
(tiles for a tiled decode or encode, thousandths of the multiply-adds for a streamed decode).
It only observes: results are the same with or without one. An exception it raises stops the
loop there (how the web app cancels a job).

Usage::

    image = decode_tiled(vae, z, plan, progress=lambda done, total: print(f"{done}/{total}"))
    image = decode_tiled(vae, z, plan, progress=terminal_bar("decode", "tile"))
"""

from __future__ import annotations

from typing import Callable

__all__ = ["Progress", "counter", "fractions", "terminal_bar"]

Progress = Callable[[int, int], None]


def counter(progress: Progress | None, total: int) -> Callable[[], None]:
    """A `tick()` that reports one more unit of `total` to `progress` (nothing when it is None)."""
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    return tick


def fractions(progress: Progress | None, total_work: int, steps: int = 1000) -> Callable[[int], None]:
    """An `advance(amount)` that adds `amount` of `total_work` and reports thousandths (of `steps`) to
    `progress` whenever that count grows: for loops whose pieces differ in cost, or are too many
    to report one by one."""
    state = {"work": 0, "reported": 0}

    def advance(amount: int) -> None:
        state["work"] += amount
        reached = min(steps, state["work"] * steps // max(1, total_work))
        if progress is not None and reached > state["reported"]:
            state["reported"] = reached
            progress(reached, steps)

    return advance


def terminal_bar(description: str, unit: str = "it", leave: bool = True) -> Progress:
    """A `Progress` drawing a tqdm bar (the look of the sampler's step bar); it closes at done == total
    (and is wiped then unless `leave`: for a bar under another one)."""
    from tqdm.auto import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=description, unit=unit, leave=leave)
        bar.update(done - bar.n)
        if done >= total:
            bar.refresh()  # draw the final count even when the work outran tqdm's redraw interval
            bar.close()
            bar = None

    return update
