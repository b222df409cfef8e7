"""``make bench-peers``: Runwarden side by side with DBOS, procrastinate, Temporal and Restate.

Nothing here is imported by the product or by Django: each engine's driver is a plain script
run in a process of its own (the peers from the ``.peers/`` virtualenv that
``bench/peers/install.sh`` makes; Runwarden through ``manage.py bench_peer``).

The contract every driver keeps (``python -m bench.peers.engine_<name> --workload W``):

- it starts what its engine needs (server, at most 2 step-executing processes), runs one
  warm-up of a few runs, then the measured workload from one submitting client, stops
  everything it started (process groups), and prints one line ``PEER_RESULT {json}``
  (``common.emit``) as its last line of stdout;
- workloads (``common.WORKLOADS``): ``noop`` (1,000 one-step no-op runs, 8 slots in all),
  ``keyed`` (200 runs over 10 keys, each holding its key exclusively for 50 ms, 20 slots;
  ideal 1.0 s), ``agent_io`` (300 one-step runs awaiting a 1.0 s stand-in for a model call,
  100 slots; ideal 3.0 s), ``signal`` (20 runs parked on an external signal, then signalled
  one at a time: signal sent -> run finished, p50/p99 ms);
- the result carries ``engine``, ``workload``, ``ok`` (bool), ``elapsed_s``, ``runs``,
  ``finished`` and, where the workload has them, ``max_overlap`` (keyed), ``latency_ms``
  ``{p50, p99}`` (signal), ``max_pg_connections`` (PostgreSQL engines), ``cpu_s``
  ``{steps, engine}`` (CPU of the step processes and of servers/dispatchers) and ``notes``.
"""
