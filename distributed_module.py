"""The torchrun helpers: joining and leaving the group, sums, gathers and broadcasts (the value
itself when alone), and ending every process together when one fails."""

from __future__ import annotations

import datetime
import json
import os
import sys
import threading
import time
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

import process_module

FAILURE, TOLD = "failure", "told"  # the store's keys: the first failure, and rank 0 has said it
POLL_SECONDS = 0.5  # how often each process looks for another's failure
TELL_SECONDS = 5.0  # how long a failing process waits for rank 0 to print its line
WRITE_SECONDS = 30.0  # how long a process that ends for another's failure lets its files land
_group: dict[str, Any] = {}  # rank, world_size, store, stop: the group this process joined
T = TypeVar("T")
_said = threading.Lock()  # rank 0 prints one failure line, from whichever thread gets there first


def init_distributed(timeout: float) -> tuple[int, int, int]:
    """Join torchrun's group when launched by it (timeout: seconds a collective waits); returns
    (rank, world size, local rank)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    if not timeout > 0:
        raise ValueError(f"DIST_TIMEOUT = {timeout!r} is out of range: use a number of seconds > 0")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    wait = datetime.timedelta(seconds=timeout)
    store = _fresh_store(rank, world_size, wait)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=wait)
    _group.update(rank=rank, world_size=world_size, store=store, stop=threading.Event(), shared=0)
    threading.Thread(target=_watch, args=(store.clone(), rank, _group["stop"]), daemon=True,
                     name="failure watch").start()
    return rank, world_size, local_rank


def _fresh_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The group's store, under a prefix only this start uses. torchrun's agent keeps one TCPStore
    across restarts (TORCHELASTIC_USE_AGENT_STORE), read with no prefix, so a restart reads the
    killed start's keys: dead ranks' gloo addresses ("Gloo connectFullMesh failed", or a hang).
    TORCHELASTIC_RESTART_COUNT can't tell starts apart: each node's agent counts its own restarts
    (pytorch/pytorch#135712). So rank 0 draws one fresh number from the store's counter, given to
    each rank under a key named by a ticket it alone drew: no earlier start's key answers."""
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # rank 0 hosts a new one
        store = dist.TCPStore(address, port, world_size, rank == 0, timeout=timeout)
        return dist.PrefixStore("run", store)
    store = dist.TCPStore(address, port, world_size, False, timeout=timeout)
    ticket = store.add("ticket", 1)
    if rank != 0:
        store.set(f"ticket/{rank}", str(ticket))
        store.wait([f"start/{ticket}"], timeout)
        start = store.get(f"start/{ticket}").decode()
        store.set(f"joined/{start}/{rank}", "")
        return dist.PrefixStore(f"start/{start}", store)
    waiting, deadline = set(range(1, world_size)), time.monotonic() + timeout.total_seconds()
    while waiting:  # a stale ticket/{r} gets an answer no live process waits for: harmless
        for other in list(waiting):
            if store.check([f"ticket/{other}"]):
                store.set(f"start/{store.get(f'ticket/{other}').decode()}", str(ticket))
            if store.check([f"joined/{ticket}/{other}"]):
                waiting.discard(other)
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks {sorted(waiting)} did not join within DIST_TIMEOUT")
        time.sleep(0.02)
    return dist.PrefixStore(f"start/{ticket}", store)


def _watch(store: dist.Store, rank: int, stop: threading.Event) -> None:
    """Daemon thread: when another process failed, rank 0 prints its line and this one ends with its
    status, wherever the main thread waits (NCCL collectives never notice a peer that left)."""
    while not stop.wait(POLL_SECONDS):
        try:
            failure = _failure(store) if store.check([FAILURE]) else None
        except (dist.DistError, ValueError):  # the agent's store is gone: torchrun is ending
            return
        if failure is not None and failure[0] != rank and not stop.is_set():
            # interrupted too (a terminal's Ctrl-C reaches every process): it ends on its own once
            # the files it is writing (the training curves, say) land whole
            if process_module.ended() and stop.wait(WRITE_SECONDS):
                return
            _tell(store, rank, failure[2])
            for thread in threading.enumerate():  # an epoch's files being written land whole
                if not thread.daemon and thread is not threading.main_thread():
                    thread.join(WRITE_SECONDS)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(failure[1])


def _failure(store: dist.Store) -> tuple[int, int, str]:
    """The first failure: (its rank, its exit status, its line)."""
    rank, status, line = store.get(FAILURE).decode().split("|", 2)
    return int(rank), int(status), line


def _tell(store: dist.Store, rank: int, line: str) -> None:
    """Rank 0 prints the failure's line (once), and marks it said."""
    if rank == 0 and _said.acquire(blocking=False):
        if line:
            print(line, file=sys.stderr, flush=True)
        store.set(TOLD, "")


def end_together(status: int, line: str | None) -> int:
    """The status to exit with, and line printed, for a run stopping early. Under torchrun the first
    to fail sets all processes' status and line before any leaves, so none waits at a collective for
    it; rank 0 prints, the others wait a few seconds until it has."""
    if "store" not in _group:
        if line:
            print(line, file=sys.stderr)
        return status
    process_module.ending()  # torchrun's SIGTERM, once another process leaves, is ignored
    store, rank = _group["store"], _group["rank"]
    try:
        store.compare_set(FAILURE, "", f"{rank}|{status}|{line or ''}")
        _, status, line = _failure(store)
    except dist.DistError:  # the agent's store is gone: torchrun is ending every process
        if rank == 0 and line:
            print(line, file=sys.stderr)
        return status
    _tell(store, rank, line)
    if rank != 0:
        try:
            store.wait([TOLD], datetime.timedelta(seconds=TELL_SECONDS))
        except dist.DistError:  # rank 0 is gone: torchrun's summary names what ended it
            pass
    return status


def node_first(make: Callable[[], T], doing: str) -> T:
    """make() on each node's local rank 0 first, then on the rest (doing: for the line a wait
    prints), so a node-local image cache is built once and the others open it."""
    if "store" not in _group:
        return make()
    key = f"node_first/{os.environ.get('GROUP_RANK', '0')}/{doing}"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank == 0:
        made = make()
        _group["store"].set(key, "")
        return made
    started = time.monotonic()
    while not _group["store"].check([key]):  # as long as it takes; a failure ends this process
        if local_rank == 1 and started is not None and time.monotonic() - started > 1:
            print(f"note: local rank 0 of this node is {doing}; its other processes wait for it",
                  file=sys.stderr, flush=True)
            started = None
        time.sleep(0.2)
    return make()


def failed_collective(error: Exception, died: int) -> int | None:
    """Exit status for an error escaping a torchrun run: that of the process whose failure broke a
    collective, `died` for one that ended without a word (killed), or None when the error is this
    process's own."""
    if "store" not in _group or not (isinstance(error, dist.DistError) or "gloo" in str(error)):
        return None
    store = _group["store"]
    try:  # a failing process says so before it leaves
        if store.check([FAILURE]):
            return end_together(0, None)
    except dist.DistError:
        pass
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return end_together(died, f"error: another process of this run ended without a word (killed, "
                              f"or short of memory?): {first}")


def close_distributed() -> None:
    """Leave the torchrun process group (exiting without this can abort in gloo's threads)."""
    if "stop" in _group:
        _group["stop"].set()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank in the group it joined (0 alone)."""
    return _group.get("rank", 0)


def is_distributed() -> bool:
    """Whether this process is one of several under torchrun."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over every process (the tensor itself when alone)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def share_buffers(*models: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm stats) on every rank: each one's last step set its own, but all
    must evaluate one model."""
    if is_distributed():
        for buffer in {id(b): b for model in models for b in model.buffers()}.values():
            dist.broadcast(buffer, src=0)


def gather(obj: Any) -> list[Any]:
    """Every process's obj, in rank order ([obj] when alone)."""
    if not is_distributed():
        return [obj]
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def from_rank_0(value: Any) -> Any:
    """Rank 0's JSON value (LRA's prompt answers) on every process, however long a person takes: the
    others poll the store, where a collective would end them after DIST_TIMEOUT."""
    if "store" not in _group:
        return value
    _group["shared"] += 1  # every process shares as often, in order (init_distributed sets 0)
    store, key = _group["store"], f"from_rank_0/{_group['shared']}"
    if _group["rank"] == 0:
        store.set(key, json.dumps(value))
        return value
    while not store.check([key]):  # a failure elsewhere ends this process (the failure watch)
        time.sleep(POLL_SECONDS)
    return json.loads(store.get(key))


def broadcast(obj: Any) -> Any:
    """Rank 0's value of obj on every process (obj itself when alone)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
