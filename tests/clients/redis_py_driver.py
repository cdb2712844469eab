#!/usr/bin/env python3
"""redis-py driver of the test lab (tests/src/clients.rs).

Reads one workload (JSON) from argv[1] or stdin, runs it with redis-py's
blocking `Connection` (one thread per connection), prints one result (JSON)
on stdout. Fields and semantics: docs/lab.md, "Client drivers"; the command
generator is the same in ioredis_driver.js and clients.rs.

Timing is as close to the socket as redis-py allows: the clock starts before
`send_packed_command` (one sendall of the whole batch) and stops after the
batch's last `read_response`; each command of the batch gets that time.
"""

import json
import sys
import threading
import time

import redis
from redis._parsers import _RESP2Parser
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, ResponseError, TimeoutError
from redis.retry import Retry


class RawErrorParser(_RESP2Parser):
    """Error replies as `ResponseError(<full text>)`: redis-py strips the
    code of some errors and maps others to other classes; we count codes."""

    @classmethod
    def parse_error(cls, response):
        return ResponseError(response)


def command_args(name, conn, i, keys, value):
    """The arguments of request `i` of connection `conn` (name upper-case)."""
    k = i % keys
    s, c, h, l, st, z = (f"{p}:{conn}:{k}" for p in ("str", "ctr", "hash", "list", "set", "zset"))
    table = {
        "PING": [],
        "GET": [s],
        "SET": [s, value],
        "DEL": [s],
        "EXISTS": [s],
        "INCR": [c],
        "DECR": [c],
        "HSET": [h, "field", value],
        "HGET": [h, "field"],
        "HGETALL": [h],
        "LPUSH": [l, value],
        "RPUSH": [l, value],
        "LPOP": [l],
        "RPOP": [l],
        "LRANGE": [l, "0", "9"],
        "SADD": [st, value],
        "SMEMBERS": [st],
        "ZADD": [z, "1", value],
    }
    if name not in table:
        raise SystemExit(f"redis_py_driver: no generator for command {name!r}")
    return [name] + table[name]


def error_code(exc):
    text = str(exc)
    return text.split(" ", 1)[0] if text else "ERR"


class Worker:
    def __init__(self, index, w):
        self.index = index
        self.w = w
        self.counts = {}
        self.errors = {}
        self.timeouts = 0
        self.latencies = {}
        self.failure = None
        self.conn = None

    def connect(self):
        timeout = self.w.get("timeout_ms")
        tls = {}
        connection_class = redis.Connection
        if self.w.get("tls_ca"):
            connection_class = redis.SSLConnection
            tls = {"ssl_ca_certs": self.w["tls_ca"], "ssl_check_hostname": False}
        self.conn = connection_class(
            **tls,
            host=self.w["host"],
            port=self.w["port"],
            socket_timeout=None if timeout is None else timeout / 1000.0,
            socket_connect_timeout=10.0,
            parser_class=RawErrorParser,
            lib_name=None,
            lib_version=None,
            retry=Retry(NoBackoff(), 0),
        )
        self.conn.connect()

    def batch(self, commands):
        """Sends `commands` in one write, reads their replies."""
        if self.conn is None:
            self.connect()
        packed = self.conn.pack_commands(commands)
        names = [str(c[0]).upper() for c in commands]
        start = time.perf_counter_ns()
        self.conn.send_packed_command(packed, check_health=False)
        for name in names:
            self.counts[name] = self.counts.get(name, 0) + 1
        delay = self.w.get("read_delay_ms", 0)
        if delay:
            time.sleep(delay / 1000.0)
        replies = []
        lost = None
        try:
            for _ in names:
                try:
                    replies.append(self.conn.read_response(disable_decoding=True))
                except ResponseError as e:
                    replies.append(e)
        except (TimeoutError, ConnectionError) as e:
            lost = e
        elapsed_us = (time.perf_counter_ns() - start) // 1000
        for name, reply in zip(names, replies):
            if isinstance(reply, ResponseError):
                code = error_code(reply)
                self.errors[code] = self.errors.get(code, 0) + 1
        if lost is None:
            for name in names:
                self.latencies.setdefault(name, []).append(elapsed_us)
            return
        # Replies missing: a timeout (or a closed connection) gives up the
        # batch; the next batch opens a new connection.
        missing = len(names) - len(replies)
        if isinstance(lost, TimeoutError):
            self.timeouts += missing
        else:
            self.errors["CONNECTION"] = self.errors.get("CONNECTION", 0) + missing
        self.conn.disconnect()
        self.conn = None

    def run(self):
        try:
            w = self.w
            self.connect()
            for raw in w.get("raw", []):
                self.batch([list(map(str, raw))])
            value = "x" * w.get("value_size", 16)
            commands = [c.upper() for c in w.get("commands", ["PING"])]
            keys = w.get("keys", 100)
            pipeline = max(1, w.get("pipeline", 1))
            requests = w.get("requests", 0)
            i = 0
            while i < requests:
                n = min(pipeline, requests - i)
                self.batch(
                    [command_args(commands[(i + j) % len(commands)], self.index, i + j, keys, value) for j in range(n)]
                )
                i += n
            if self.conn is not None:
                self.conn.disconnect()
        except BaseException as e:  # reported, not swallowed
            self.failure = f"connection {self.index}: {type(e).__name__}: {e}"


def main():
    text = sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read()
    w = json.loads(text)
    workers = [Worker(i, w) for i in range(w.get("connections", 1))]
    threads = [threading.Thread(target=worker.run) for worker in workers]
    start = time.perf_counter_ns()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total_us = (time.perf_counter_ns() - start) // 1000
    result = {"counts": {}, "errors": {}, "timeouts": 0, "latencies_us": {}, "total_us": total_us}
    for worker in workers:
        if worker.failure:
            print(worker.failure, file=sys.stderr)
            sys.exit(1)
        for name, n in worker.counts.items():
            result["counts"][name] = result["counts"].get(name, 0) + n
        for code, n in worker.errors.items():
            result["errors"][code] = result["errors"].get(code, 0) + n
        result["timeouts"] += worker.timeouts
        for name, values in worker.latencies.items():
            result["latencies_us"].setdefault(name, []).extend(values)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
