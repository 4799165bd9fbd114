"""Choose the simulator's event loop by measurement: the same message-passing workload on
twlb.sim's heap kernel and on simpy (callbacks on timeouts, and one process per node with
a Store inbox, simpy's idiomatic form), side by side in one run.

Two pairs are compared: the bare primitives (a heapq loop against simpy timeouts with
callbacks, doing the same forwarding), and whole simulators (the kernel, with its
network model, statistics and the ProtocolNode contract, against simpy driving the same
node objects and Effects without any network model).

Rates are per CPU-second of the process (time.process_time): on the shared machine a
process rarely gets a whole core, and CPU time is what one core would take.

Workload: N nodes; M messages circulate; each delivery makes the receiver forward a new
message to a peer drawn at random, after a latency uniform in 10..100 ms. We count
deliveries per second of wall time until a fixed number have been delivered.

    .venv/bin/python bench/sim_kernel_bench.py --deliveries 200000 --output reports/sim_kernel_bench.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import simpy
from twlb.sim.kernel import Kernel
from twlb.sim.network import NetworkConfig

from twlb.protocol import Effects


@dataclass(frozen=True, slots=True)
class Hop:
    n: int


class ForwardNode:
    """Forwards every message it gets to a random peer; starts `initial` of them."""

    def __init__(self, node_id, peers, rng, config):
        self.node_id, self.peers, self.rng = node_id, peers, rng
        self.initial = config["initial"]

    def start(self, now):
        return Effects(send=[(self.rng.choice(self.peers), Hop(0)) for _ in range(self.initial)])

    def on_message(self, src, message, now):
        return Effects(send=[(self.rng.choice(self.peers), Hop(message.n + 1))])

    def on_timer(self, now):
        return Effects()

    def on_request(self, request, now):
        return Effects()

    def persistent_state(self):
        return {}


def run_kernel(nodes: int, circulating: int, deliveries: int, seed: int) -> float:
    kernel = Kernel(seed=seed, network=NetworkConfig(latency_ms=(10, 100)))
    ids = [f"n{i}" for i in range(nodes)]
    for node_id in ids:
        peers = [p for p in ids if p != node_id]
        kernel.spawn(ForwardNode, node_id, peers, {"initial": circulating // nodes})
    start = time.process_time()
    kernel.run(until=float("inf"), max_events=deliveries)
    elapsed = time.process_time() - start
    assert kernel.stats.delivered == deliveries
    return deliveries / elapsed


def run_simpy_callbacks(nodes: int, circulating: int, deliveries: int, seed: int) -> float:
    env = simpy.Environment()
    rng = random.Random(seed)
    ids = [f"n{i}" for i in range(nodes)]
    peers = {n: [p for p in ids if p != n] for n in ids}
    count = [0]

    def send(dst, message):
        event = env.timeout(0.010 + 0.090 * rng.random(), (dst, message))
        event.callbacks.append(deliver)

    def deliver(event):
        dst, message = event.value
        count[0] += 1
        if count[0] >= deliveries:
            raise simpy.core.StopSimulation(None)
        send(rng.choice(peers[dst]), Hop(message.n + 1))

    for node_id in ids:
        for _ in range(circulating // nodes):
            send(rng.choice(peers[node_id]), Hop(0))
    start = time.process_time()
    env.run()
    elapsed = time.process_time() - start
    assert count[0] == deliveries
    return deliveries / elapsed


def run_bare_heap(nodes: int, circulating: int, deliveries: int, seed: int) -> float:
    """The same work as run_simpy_callbacks on a plain heapq loop: the two event-loop
    primitives compared with nothing else around them."""
    rng = random.Random(seed)
    ids = [f"n{i}" for i in range(nodes)]
    peers = {n: [p for p in ids if p != n] for n in ids}
    queue: list = []
    seq = 0
    for node_id in ids:
        for _ in range(circulating // nodes):
            heapq.heappush(
                queue, (0.010 + 0.090 * rng.random(), seq, rng.choice(peers[node_id]), Hop(0))
            )
            seq += 1
    count = 0
    start = time.process_time()
    while count < deliveries:
        now, _s, dst, message = heapq.heappop(queue)
        count += 1
        heapq.heappush(
            queue,
            (now + 0.010 + 0.090 * rng.random(), seq, rng.choice(peers[dst]), Hop(message.n + 1)),
        )
        seq += 1
    return deliveries / (time.process_time() - start)


def run_simpy_nodes(nodes: int, circulating: int, deliveries: int, seed: int) -> float:
    """simpy driving the same ForwardNode objects and Effects as the kernel does (no
    network faults, no FIFO links: a lower bound on what simpy would cost)."""
    env = simpy.Environment()
    rng = random.Random(seed)
    ids = [f"n{i}" for i in range(nodes)]
    count = [0]
    objs = {}

    def apply(src, effects):
        for dst, message in effects.send:
            event = env.timeout(0.010 + 0.090 * rng.random(), (src, dst, message))
            event.callbacks.append(deliver)

    def deliver(event):
        src, dst, message = event.value
        count[0] += 1
        if count[0] >= deliveries:
            raise simpy.core.StopSimulation(None)
        apply(dst, objs[dst].on_message(src, message, env.now))

    for node_id in ids:
        peers = [p for p in ids if p != node_id]
        objs[node_id] = ForwardNode(node_id, peers, rng, {"initial": circulating // nodes})
    for node_id in ids:
        apply(node_id, objs[node_id].start(0.0))
    start = time.process_time()
    env.run()
    return deliveries / (time.process_time() - start)


def run_simpy_processes(nodes: int, circulating: int, deliveries: int, seed: int) -> float:
    env = simpy.Environment()
    rng = random.Random(seed)
    ids = [f"n{i}" for i in range(nodes)]
    inbox = {n: simpy.Store(env) for n in ids}
    peers = {n: [p for p in ids if p != n] for n in ids}
    count = [0]
    done = env.event()

    def link(dst, message):
        yield env.timeout(0.010 + 0.090 * rng.random())
        yield inbox[dst].put(message)

    def node(node_id):
        for _ in range(circulating // nodes):
            env.process(link(rng.choice(peers[node_id]), Hop(0)))
        while True:
            message = yield inbox[node_id].get()
            count[0] += 1
            if count[0] == deliveries:
                done.succeed()
            env.process(link(rng.choice(peers[node_id]), Hop(message.n + 1)))

    for node_id in ids:
        env.process(node(node_id))
    start = time.process_time()
    env.run(until=done)
    elapsed = time.process_time() - start
    return deliveries / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--circulating", type=int, default=500)
    parser.add_argument("--deliveries", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("reports/sim_kernel_bench.json"))
    args = parser.parse_args()
    runners = {
        "twlb.sim heap kernel": run_kernel,
        "simpy driving the same nodes (callbacks)": run_simpy_nodes,
        "bare heapq loop": run_bare_heap,
        "simpy (timeout callbacks)": run_simpy_callbacks,
        "simpy (process per node, Store inbox)": run_simpy_processes,
    }
    results = {}
    for name, runner in runners.items():
        rates = [
            runner(args.nodes, args.circulating, args.deliveries, seed)
            for seed in range(args.repeats)
        ]
        results[name] = {"deliveries_per_s_best": max(rates), "deliveries_per_s_all": rates}
        print(f"{name:45s} {max(rates):>12,.0f} deliveries per CPU-second (best of {args.repeats})")
    kernel_rate = results["twlb.sim heap kernel"]["deliveries_per_s_best"]
    for row in results.values():
        row["relative_to_kernel"] = row["deliveries_per_s_best"] / kernel_rate
    report = {
        "workload": vars(args) | {"output": str(args.output), "latency_ms": [10, 100]},
        "simpy_version": simpy.__version__,
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
