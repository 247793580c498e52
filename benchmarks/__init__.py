"""feedfan's benchmark suite: pick ``fanout_chunk_size`` from numbers on your own brokers.

Run ``python -m benchmarks --help``. Steps:

``sweep``
    one activity to N followers for a range of chunk sizes, per backend and broker
``priority``
    a HIGH fanout behind a backlog of LOW fanouts, against the same on idle queues
``dispatch``
    enqueue time of chunk tasks, the adapter's bulk path against one call per task
``baselines``
    the raw limits of the Redis at hand, feedfan's two write modes, Stream Framework

Everything runs on real brokers with real worker processes, started the way a
user starts them (``python -m feedfan worker``). Results go under ``--out DIR``:
a JSON file, a PNG plot and the terminal tables, labelled with the machine and
date, and a recommended ``fanout_chunk_size`` per backend with the reasoning.
"""
