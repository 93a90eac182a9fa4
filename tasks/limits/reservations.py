"""The reservations a Redis lane holds: each request goes at its moment, and one reached late is given up.

The shared script grants a waiting request a reservation: a delay after which it goes. This module
keeps those not yet due, lets each go at its moment, and keeps the process within its fair share of
reservations ahead. A reservation this process reaches more than ``late_seconds`` after its moment
(its loop was stalled) is given up once: its slot goes back, the request goes back to the head of
the line, and the capacity of the moment that passed is not spent twice. Sent anyway, the late
ones of a stall would all go together, on top of what other processes send at that moment.

Usage:
    >>> book = ReservationBook(loop, late_seconds=0.05, release=lane.release, requeue=lane.requeue,
    ...                        ask_again=lane.ask_again)
    >>> book.schedule(waiter, due=loop.time() + 0.01)
    >>> book.note_share(share=12, blocked=True)     # True: hold off asking until half has gone
"""

# Standard library imports
import asyncio
from dataclasses import dataclass
from typing import Callable

# How close to now a reservation must be to go at once instead of on a timer.
DUE_NOW_SECONDS = 0.0005


@dataclass
class Waiter:
    """One request waiting in a lane's line.

    Attributes:
        tokens: its token estimate.
        future: done when it may go.
        due: when its reservation is for (the loop's clock), once granted.
        forfeited: True once it has given up a reservation it reached late.
    """

    tokens: float
    future: "asyncio.Future[None]"
    due: float = 0.0
    forfeited: bool = False


class ReservationBook:
    """Reservations granted and not yet due, the fair share of them, and the ones given up late."""

    def __init__(self, loop: asyncio.AbstractEventLoop, late_seconds: float, release: Callable[[float], None],
                 requeue: Callable[[Waiter], None], ask_again: Callable[[], None]) -> None:
        """
        Args:
            loop: the lane's event loop (its clock and timers).
            late_seconds: how late a reservation may be reached before it is given up.
            release: gives a slot (and its tokens) back to the shared engine.
            requeue: puts a waiter back at the head of the line.
            ask_again: asks the shared engine again (the share is free again).
        """
        self.loop = loop
        self.late_seconds = late_seconds
        self._release = release
        self._requeue = requeue
        self._ask_again = ask_again
        self.ahead = 0
        self.share = 1
        self.blocked_by_share = False
        self.forfeited = 0

    def schedule(self, waiter: Waiter, due: float) -> None:
        """Let ``waiter`` go at ``due`` (at once when that is now)."""
        waiter.due = due
        if due <= self.loop.time() + DUE_NOW_SECONDS:
            self.let_go(waiter)
        else:
            self.ahead += 1
            self.loop.call_at(due, self._on_due, waiter)

    def note_share(self, share: int, blocked: bool) -> bool:
        """Record the share the script allows; True when this process must wait for half its share to go."""
        self.share = share
        self.blocked_by_share = blocked and self.ahead > share // 2
        return self.blocked_by_share

    def clear_block(self) -> None:
        """Ask again without waiting for the share (the limits changed)."""
        self.blocked_by_share = False

    def let_go(self, waiter: Waiter) -> None:
        """A reservation's moment has come: the waiter goes, gives a late one up once, or (cancelled) frees it."""
        if waiter.future.done():
            self._release(waiter.tokens)
        elif self.loop.time() - waiter.due > self.late_seconds and not waiter.forfeited:
            waiter.forfeited = True
            self.forfeited += 1
            self._release(waiter.tokens)
            self._requeue(waiter)
        else:
            waiter.future.set_result(None)

    def _on_due(self, waiter: Waiter) -> None:
        """A timer's reservation is due: let it go, and ask for more once half the share has gone."""
        self.ahead -= 1
        self.let_go(waiter)
        if self.blocked_by_share and self.ahead <= self.share // 2:
            self.blocked_by_share = False
            self._ask_again()
