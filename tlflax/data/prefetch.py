"""Host batches -> global jax.Arrays, a few batches ahead in a background thread."""

from __future__ import annotations

import queue
import threading

_DONE = object()


def prefetch_to_device(iterator, size: int, sharding):
    """Yield each host batch (a dict of numpy arrays) as global arrays laid out by `sharding`.

    Each host passes its own share; jax.make_array_from_process_local_data assembles the
    global batch. A thread stays `size` batches ahead so gathering, copying and transfer
    overlap the step. Leaving the loop early (break, islice) stops the thread.
    """
    import jax

    if size < 1:
        yield from (_to_global(jax, batch, sharding) for batch in iterator)
        return
    ready: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for batch in iterator:
                if not put(_to_global(jax, batch, sharding)):
                    return
            put(_DONE)
        except BaseException as e:  # re-raised in the consumer, with its traceback
            put(e)

    thread = threading.Thread(target=produce, name="tlflax-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _to_global(jax, batch: dict, sharding) -> dict:
    return {
        key: jax.make_array_from_process_local_data(sharding, value) for key, value in batch.items()
    }
