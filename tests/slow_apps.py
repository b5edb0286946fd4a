"""A numpy app for tests of long and failing local training (``app: tests.slow_apps``).

``app_options``:

- ``train_s``: how long ``train`` takes (sleeping in 0.05 s steps: the process is idle, as
  one waiting on a GPU would be); a task's ``max_batches`` overrides it (that many steps);
- ``cooperative``: whether ``train`` checks :func:`brokerfl.app.cancellation_requested`
  between steps (a black box that never does runs to its end);
- ``fail_partitions``: the partitions whose ``train`` raises (partition ``int(client_id)``
  for numeric ids): a ValueError whose message has a newline and a terminal escape, which
  the server must not show raw.

Every ``train`` call is recorded in :data:`CALLS` (this process's): its partition, whether it
saw a cancellation, whether it finished.
"""

from __future__ import annotations

import time

import numpy as np

from brokerfl.app import TrainingCancelled, cancellation_requested

CALLS: list[dict] = []
STEP_S = 0.05


def model(options):
    return {"w": np.zeros(4, np.float32)}


def load_partition(index, num_partitions, options, seed):
    x = np.full((10, 4), float(index), np.float32)  # the partition's index rides in its data (train reads it)
    return x, np.zeros(10, np.float32)


def train(parameters, data, settings, seed, options):
    partition = int(data[0][0, 0])
    call = {"partition": partition, "cancelled": False, "finished": False}
    CALLS.append(call)
    if partition in options.get("fail_partitions", []):
        raise ValueError(f"boom in partition {partition}\n\x1b[31mnot a log line")
    seconds = STEP_S * settings.max_batches if settings.max_batches else float(options.get("train_s", 0.0))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if options.get("cooperative", True) and cancellation_requested():
            call["cancelled"] = True
            raise TrainingCancelled("asked to stop")
        time.sleep(STEP_S)
    call["finished"] = True
    return {k: v + 0.1 for k, v in parameters.items()}, {"loss": 1.0}


def evaluate(parameters, data, options):
    return {"loss": 1.0, "accuracy": 0.5}
