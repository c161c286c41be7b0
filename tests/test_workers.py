"""The leased work loop: crashes end visibly, stop never strands a claim, wakes are kept."""

from __future__ import annotations

import asyncio
import time

from app.workers import WorkLoop


class Recorder:
    def __init__(self) -> None:
        self.processed: list[int] = []
        self.released: list[int] = []
        self.crashed: list[tuple[int, str]] = []
        self.claims: list[float] = []

    async def release(self, item: int) -> None:
        self.released.append(item)

    async def crash(self, item: int, exc: Exception) -> None:
        self.crashed.append((item, type(exc).__name__))


def make_loop(rec: Recorder, claim, process, poll: float = 5.0) -> WorkLoop[int]:  # type: ignore[no-untyped-def]
    return WorkLoop(
        "test",
        claim=claim,
        process=process,
        release=rec.release,
        crashed=rec.crash,
        concurrency=4,
        poll_seconds=poll,
    )


async def test_a_crashing_item_ends_in_crashed_once_not_in_a_retry_loop() -> None:
    rec = Recorder()
    batches = [[1, 2], [], []]

    async def claim(limit: int) -> list[int]:
        return batches.pop(0) if batches else []

    async def process(item: int) -> None:
        if item == 1:
            raise KeyError("a bug")
        rec.processed.append(item)

    loop = make_loop(rec, claim, process, poll=0.05)
    runner = asyncio.create_task(loop.run())
    await asyncio.sleep(0.3)
    await loop.stop(grace=1)
    await runner
    assert rec.processed == [2]
    assert rec.crashed == [(1, "KeyError")]
    assert rec.released == []


async def test_stop_during_a_claim_gives_the_claimed_items_back() -> None:
    rec = Recorder()
    claim_started = asyncio.Event()
    finish_claim = asyncio.Event()

    async def claim(limit: int) -> list[int]:
        claim_started.set()
        await finish_claim.wait()
        return [7, 8]

    async def process(item: int) -> None:
        rec.processed.append(item)

    loop = make_loop(rec, claim, process)
    runner = asyncio.create_task(loop.run())
    await claim_started.wait()
    stopping = asyncio.create_task(loop.stop(grace=1))
    await asyncio.sleep(0.05)
    finish_claim.set()  # the claim returns after stop() began
    await stopping
    await runner
    assert rec.processed == []
    assert sorted(rec.released) == [7, 8]


async def test_cancelled_after_grace_items_are_released() -> None:
    rec = Recorder()
    batches = [[3]]

    async def claim(limit: int) -> list[int]:
        return batches.pop(0) if batches else []

    async def process(item: int) -> None:
        await asyncio.sleep(60)  # a hung upstream

    loop = make_loop(rec, claim, process, poll=0.05)
    runner = asyncio.create_task(loop.run())
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await loop.stop(grace=0.2)
    await runner
    assert time.monotonic() - started < 2
    assert rec.released == [3]


async def test_a_wake_during_a_claim_is_not_lost() -> None:
    rec = Recorder()
    loop: WorkLoop[int]

    async def claim(limit: int) -> list[int]:
        rec.claims.append(time.monotonic())
        if len(rec.claims) == 1:
            loop.wake()  # new work arrived while this claim was running
        return []

    async def process(item: int) -> None:
        return None

    loop = make_loop(rec, claim, process, poll=5.0)
    runner = asyncio.create_task(loop.run())
    await asyncio.sleep(0.3)
    await loop.stop(grace=1)
    await runner
    assert len(rec.claims) >= 2
    assert rec.claims[1] - rec.claims[0] < 0.5  # not the 5 s poll


async def test_running_items_renew_their_lease_until_they_end() -> None:
    rec = Recorder()
    batches = [[1, 2]]
    renewed: list[tuple[int, float]] = []
    lost = {2}  # item 2's lease was taken: renewing it stops at the first refusal

    async def claim(limit: int) -> list[int]:
        return batches.pop(0) if batches else []

    ended: dict[int, float] = {}

    async def process(item: int) -> None:
        await asyncio.sleep(0.35)
        rec.processed.append(item)
        ended[item] = time.monotonic()

    async def extend(item: int) -> bool:
        renewed.append((item, time.monotonic()))
        return item not in lost

    loop = WorkLoop(
        "test",
        claim=claim,
        process=process,
        release=rec.release,
        crashed=rec.crash,
        concurrency=4,
        poll_seconds=0.05,
        extend=extend,
        heartbeat_seconds=0.1,
    )
    runner = asyncio.create_task(loop.run())
    await asyncio.sleep(0.6)
    await loop.stop(grace=1)
    await runner
    assert sorted(rec.processed) == [1, 2]
    beats = [at for item, at in renewed if item == 1]
    assert len(beats) >= 2, "renewed every 0.1 s while it ran"
    assert all(at < ended[1] for at in beats), "and never after it ended"
    assert [item for item, _ in renewed].count(2) == 1, "a lost lease is not renewed again"
