"""Realistic upstream payloads: protobuf `execution` and `event` messages as the real
publishers send them, and, on request, a share of the malformed payloads a broken
publisher sends.

    for p in payloads("execution", seed=1, malformed_share=0.01):
        p.data      # the bytes to publish
        p.defect    # None, or which kind of malformed payload this is

Executions random-walk a price per symbol (each symbol trades on its own market);
sport events follow matches that run for a while and then give way to new ones.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, NamedTuple

from shared.codec import feed_of
from shared.feeds import EXECUTION, SPORT_EVENT
from shared.proto import event_pb2, execution_pb2


class Payload(NamedTuple):
    data: bytes
    defect: str | None  # None for a good message, else one of DEFECTS


# symbol -> (market, starting price)
SYMBOLS: Final[dict[str, tuple[str, float]]] = {
    "AAPL": ("NASDAQ", 189.25),
    "MSFT": ("NASDAQ", 415.10),
    "NVDA": ("NASDAQ", 121.40),
    "AMZN": ("NASDAQ", 178.60),
    "GOOGL": ("NASDAQ", 171.20),
    "META": ("NASDAQ", 492.80),
    "TSLA": ("NASDAQ", 248.50),
    "JPM": ("NYSE", 201.30),
    "V": ("NYSE", 276.90),
    "KO": ("NYSE", 62.15),
    "XOM": ("NYSE", 118.70),
    "BRK.B": ("NYSE", 452.00),
    "WMT": ("NYSE", 79.40),
    "HSBA": ("LSE", 6.92),
    "BP.": ("LSE", 4.71),
    "VOD": ("LSE", 0.71),
    "SHEL": ("LSE", 27.35),
    "AZN": ("LSE", 122.60),
    "SAP": ("XETRA", 201.50),
    "SIE": ("XETRA", 178.30),
    "MC": ("EURONEXT", 702.40),
    "ASML": ("EURONEXT", 912.70),
    "7203": ("TSE", 2810.0),
    "6758": ("TSE", 3120.0),
    "0700": ("HKEX", 388.20),
}

# Where the order was placed: US state (or Canadian province) codes.
STATE_SYMBOLS: Final = (
    "NY", "CA", "IL", "TX", "MA", "NJ", "FL", "WA", "PA", "GA", "CT", "CO", "ON", "QC",
)

TEAMS: Final[dict[int, tuple[str, ...]]] = {
    event_pb2.BASEBALL: ("Yankees", "Red Sox", "Dodgers", "Cubs", "Giants", "Astros", "Mets", "Braves"),
    event_pb2.BASKETBALL: ("Lakers", "Celtics", "Warriors", "Bulls", "Heat", "Knicks", "Nuggets", "Bucks"),
    event_pb2.FOOTBALL: ("Arsenal", "Liverpool", "Real Madrid", "Barcelona", "Bayern", "Juventus",
                         "PSG", "Ajax", "Benfica", "Inter"),
    event_pb2.BOXING: ("Fury", "Usyk", "Joshua", "Canelo", "Crawford", "Inoue", "Bivol", "Beterbiev"),
    event_pb2.GOLF: ("Scheffler", "McIlroy", "Rahm", "Schauffele", "Hovland", "Fleetwood", "Aberg"),
    event_pb2.NASCAR: ("Larson", "Elliott", "Byron", "Hamlin", "Blaney", "Logano", "Bell", "Reddick"),
    event_pb2.TENNIS: ("Sinner", "Alcaraz", "Djokovic", "Zverev", "Medvedev", "Fritz", "Rune", "Draper"),
}

_TOURNAMENTS: Final = ("Open", "Classic", "Championship", "Invitational", "Cup Series")
_AT_BATS: Final = ("Strikeout", "Single", "Double", "Walk", "Fly out", "Ground out")
_PUNCHES: Final = ("Jab", "Right hand", "Left hook", "Uppercut", "Knockdown")
_POINTS: Final = ("ace", "break point", "double fault", "winner")
_HOLES: Final = ("Birdie", "Par", "Bogey", "Eagle")
_LAPS: Final = ("takes the lead", "pits", "passes on the outside", "caution")

DEFECTS: Final = ("garbage", "truncated", "missing_field", "invalid_utf8", "oversized")


@dataclass
class _Quote:
    market: str
    price: float


class Executions:
    """Trade executions: a price random walk per symbol, lots of round-ish sizes."""

    def __init__(self, rng: random.Random, clock: Callable[[], float] = time.time) -> None:
        self.rng = rng
        self.clock = clock
        self.quotes = {s: _Quote(m, p) for s, (m, p) in SYMBOLS.items()}
        self.symbols = tuple(SYMBOLS)

    def message(self) -> execution_pb2.execution:
        rng = self.rng
        symbol = rng.choice(self.symbols)
        quote = self.quotes[symbol]
        # Geometric random walk, ~5 bp per trade, never below a tick.
        quote.price = max(0.01, quote.price * (1.0 + rng.gauss(0.0, 0.0005)))
        tick = 0.01 if quote.price >= 1.0 else 0.0001
        price = round(round(quote.price / tick) * tick, 4)
        if rng.random() < 0.7:
            quantity = float(rng.choice((1, 5, 10, 25, 50, 100, 200, 300, 500, 1000)))
        else:
            quantity = float(rng.randint(1, 5000))
        return execution_pb2.execution(
            symbol=symbol,
            market=quote.market,
            price=price,
            quantity=quantity,
            executionEpoch=int(self.clock() * 1000),
            stateSymbol=rng.choice(STATE_SYMBOLS),
        )


@dataclass
class _Match:
    sport: int
    title: str
    home: str
    away: str
    clock: int = 0  # minutes (or round/hole/lap/game, by sport)
    home_score: int = 0
    away_score: int = 0
    left: int = 0  # events before the match ends


class SportEvents:
    """Sport events from a handful of live matches; a match that ends is replaced."""

    def __init__(self, rng: random.Random, live_matches: int = 6) -> None:
        self.rng = rng
        self.matches = [self._new_match() for _ in range(live_matches)]

    def _new_match(self) -> _Match:
        rng = self.rng
        sport = rng.choice(tuple(TEAMS))
        home, away = rng.sample(TEAMS[sport], 2)
        sep = " vs " if sport in (event_pb2.BOXING, event_pb2.TENNIS) else " - "
        title = f"{home}{sep}{away}"
        if sport in (event_pb2.GOLF, event_pb2.NASCAR):
            title = f"{rng.choice(_TOURNAMENTS)}: {title}"
        return _Match(sport, title, home, away, left=rng.randint(15, 60))

    def message(self) -> event_pb2.event:
        rng = self.rng
        i = rng.randrange(len(self.matches))
        match = self.matches[i]
        data_event = self._event(match)
        match.left -= 1
        if match.left <= 0:
            self.matches[i] = self._new_match()
        return event_pb2.event(sport=match.sport, match_title=match.title, data_event=data_event)

    def _event(self, m: _Match) -> str:
        rng = self.rng
        side = rng.choice((m.home, m.away))
        if m.left == 1:
            final = "Full time" if m.sport == event_pb2.FOOTBALL else "Final"
            return f"{final}: {m.home} {m.home_score}-{m.away_score} {m.away}"
        if m.sport == event_pb2.FOOTBALL:
            m.clock = min(90, m.clock + rng.randint(1, 6))
            minute = f"({m.clock}')"
            kind = rng.random()
            if kind < 0.2:
                if side == m.home:
                    m.home_score += 1
                else:
                    m.away_score += 1
                return f"Goal by #{rng.randint(2, 23)} {minute} {side} {m.home_score}-{m.away_score}"
            if kind < 0.45:
                return f"Yellow card #{rng.randint(2, 23)} {side} {minute}"
            if kind < 0.5:
                return f"Red card #{rng.randint(2, 23)} {side} {minute}"
            if kind < 0.75:
                return f"Corner {side} {minute}"
            return f"Substitution {side}: #{rng.randint(12, 23)} for #{rng.randint(2, 11)} {minute}"
        if m.sport == event_pb2.BASKETBALL:
            m.clock = min(47, m.clock + rng.randint(0, 2))
            points = rng.choice((1, 2, 2, 3))
            if side == m.home:
                m.home_score += points
            else:
                m.away_score += points
            what = {1: "Free throw", 2: "Two-pointer", 3: "Three-pointer"}[points]
            quarter = min(4, 1 + m.clock // 12)
            return f"{what} by #{rng.randint(0, 45)} {side} Q{quarter} {m.home_score}-{m.away_score}"
        if m.sport == event_pb2.BASEBALL:
            m.clock = min(9, m.clock + (rng.random() < 0.3))
            inning = f"{'Top' if rng.random() < 0.5 else 'Bottom'} {max(1, m.clock)}"
            if rng.random() < 0.2:
                if side == m.home:
                    m.home_score += 1
                else:
                    m.away_score += 1
                return f"Home run by #{rng.randint(1, 99)} {side} ({inning}) {m.home_score}-{m.away_score}"
            return f"{rng.choice(_AT_BATS)} ({inning})"
        if m.sport == event_pb2.BOXING:
            m.clock = min(12, m.clock + (rng.random() < 0.4))
            return f"Round {max(1, m.clock)}: {rng.choice(_PUNCHES)} by {side}"
        if m.sport == event_pb2.TENNIS:
            return f"Game {side}: {rng.randint(0, 6)}-{rng.randint(0, 6)}, {rng.choice(_POINTS)}"
        if m.sport == event_pb2.GOLF:
            m.clock = min(18, m.clock + 1)
            return f"Hole {m.clock}: {rng.choice(_HOLES)} for {side}"
        m.clock += rng.randint(1, 8)
        return f"Lap {m.clock}: {side} {rng.choice(_LAPS)}"


def malformed(good: bytes, defect: str, rng: random.Random, feed_name: str) -> bytes:
    """A bad payload of the given kind, made from a good one where that makes sense."""
    if defect == "garbage":
        # 0x00 first: field number 0 is never valid protobuf, so it cannot parse by luck.
        return b"\x00" + rng.randbytes(rng.randint(4, 64))
    if defect == "truncated":
        # Every field is required and written once, so a cut always breaks or drops one.
        return good[: rng.randint(0, len(good) - 1)]
    if defect == "missing_field":
        msg = feed_of(feed_name).message.FromString(good)
        fields = [f.name for f in msg.DESCRIPTOR.fields]
        msg.ClearField(rng.choice(fields))
        return msg.SerializePartialToString()
    if defect == "invalid_utf8":
        msg = feed_of(feed_name).message.FromString(good)
        name = "symbol" if feed_name == EXECUTION.name else "match_title"
        number = msg.DESCRIPTOR.fields_by_name[name].number
        msg.ClearField(name)
        bad = b"\xff\xfe" + b"caf\xe9"  # Latin-1, not UTF-8
        return msg.SerializePartialToString() + bytes([number << 3 | 2, len(bad)]) + bad
    if defect == "oversized":
        # A sender writing its whole fixed-size buffer: a message, then 256 KiB of zeros
        # (tag 0 is invalid protobuf). Still under NATS's default 1 MiB max payload.
        return good + bytes(256 * 1024)
    raise ValueError(f"unknown defect {defect!r}; known: {', '.join(DEFECTS)}")


def payloads(
    feed_name: str,
    *,
    seed: int | None = None,
    malformed_share: float = 0.0,
    clock: Callable[[], float] = time.time,
) -> Iterator[Payload]:
    """An endless stream of payloads for `feed_name` (`execution` or `sport_event`).

    A `malformed_share` (0..1) of them are bad, cycling through DEFECTS at random.
    The same seed gives the same sequence (but for `executionEpoch`, which is `clock`).
    """
    if not 0.0 <= malformed_share <= 1.0:
        raise ValueError(f"malformed_share must be between 0 and 1, got {malformed_share}")
    feed = feed_of(feed_name)
    rng = random.Random(seed)
    source: Executions | SportEvents
    source = Executions(rng, clock) if feed is EXECUTION else SportEvents(rng)
    assert feed in (EXECUTION, SPORT_EVENT)
    while True:
        good = source.message().SerializeToString()
        if malformed_share and rng.random() < malformed_share:
            defect = rng.choice(DEFECTS)
            yield Payload(malformed(good, defect, rng, feed.name), defect)
        else:
            yield Payload(good, None)
