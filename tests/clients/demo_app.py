"""The applications of `cargo xtask demo` (tests/src/bin/demo.rs), on redis-py,
each timing what it does itself: the ground truth the demo prints next to
the agent's alerts. One JSON object per line on stdout.

    demo_app.py scale-up HOST PORT POOL CONNECTS_PER_S SECONDS
        A new pod: opens a pool of POOL connections and keeps it, then for
        SECONDS serves requests on a fresh connection each (no reuse) at
        CONNECTS_PER_S; prints its counts and keeps the pool until stdin
        closes.
    demo_app.py connect HOST PORT TIMEOUT_S ATTEMPTS
        One request with a connect timeout of TIMEOUT_S and ATTEMPTS
        attempts in all (redis-py's Retry, no backoff); prints how it ended
        and how long the caller waited.
    demo_app.py writer ENDPOINT_FILE PORT TTL_S WRITES_PER_S MAX_S
        Writes at WRITES_PER_S to the primary named in ENDPOINT_FILE, read
        again every TTL_S (a client caching the primary endpoint's DNS
        record) and printed each time; when it has written without error
        for 3 s after errors (or after MAX_S), prints what it saw.
"""

import json
import sys
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def say(**fields):
    print(json.dumps(fields), flush=True)


def scale_up(host, port, pool_size, per_s, seconds):
    pool = []
    for _ in range(pool_size):
        client = redis.Redis(host=host, port=port, single_connection_client=True)
        client.ping()
        pool.append(client)
    say(pool=len(pool))
    started = time.monotonic()
    connects = failed = 0
    while time.monotonic() - started < seconds:
        due = started + connects / per_s
        time.sleep(max(0.0, due - time.monotonic()))
        connects += 1
        client = redis.Redis(host=host, port=port, single_connection_client=True)
        try:
            client.ping()
        except redis.exceptions.RedisError:
            failed += 1
        finally:
            client.close()
    say(pool=len(pool), connects=connects, failed=failed,
        seconds=round(time.monotonic() - started, 3))
    sys.stdin.read()  # the pool stays open until the demo closes stdin


def connect(host, port, timeout_s, attempts):
    client = redis.Redis(
        host=host, port=port, socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), attempts - 1),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError])
    started = time.monotonic()
    try:
        client.ping()
        say(outcome="ok", waited_s=round(time.monotonic() - started, 3))
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
        say(outcome="failed", error=type(e).__name__, message=str(e),
            waited_s=round(time.monotonic() - started, 3))


def error_word(e):
    if isinstance(e, redis.exceptions.ReadOnlyError):
        return "READONLY"
    if isinstance(e, redis.exceptions.BusyLoadingError):
        return "LOADING"
    if isinstance(e, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return "CONNECTION"
    return (str(e).split() or ["ERR"])[0]


def writer(endpoint_file, port, ttl_s, per_s, max_s):
    started = time.monotonic()
    primary = client = None
    resolve_at = 0.0
    writes = ok = 0
    errors = {}
    first_error = last_error = recovered = None
    switched = []
    while time.monotonic() - started < max_s:
        now = time.monotonic()
        if now >= resolve_at:
            with open(endpoint_file) as f:
                address = f.read().strip()
            resolve_at = now + ttl_s
            say(resolved=address)
            if address != primary:
                if primary is not None:
                    switched.append({"to": address, "at": time.time()})
                primary = address
                client = redis.Redis(host=primary, port=port, socket_timeout=2,
                                     socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
        time.sleep(max(0.0, started + writes / per_s - time.monotonic()))
        writes += 1
        try:
            client.set("demo:orders:last", writes)
            ok += 1
            if last_error is not None and recovered is None:
                recovered = time.time()
            if recovered is not None and time.time() - recovered >= 3:
                break
        except redis.exceptions.RedisError as e:
            word = error_word(e)
            errors[word] = errors.get(word, 0) + 1
            last_error = time.time()
            first_error = first_error or last_error
            recovered = None
    say(writes=writes, ok=ok, errors=errors, first_error=first_error,
        last_error=last_error, recovered=recovered, switched=switched)


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "scale-up":
        scale_up(args[0], int(args[1]), int(args[2]), float(args[3]), float(args[4]))
    elif mode == "connect":
        connect(args[0], int(args[1]), float(args[2]), int(args[3]))
    elif mode == "writer":
        writer(args[0], int(args[1]), float(args[2]), float(args[3]), float(args[4]))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
