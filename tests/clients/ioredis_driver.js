#!/usr/bin/env node
// ioredis driver of the test lab (tests/src/clients.rs).
//
// Reads one workload (JSON) from argv[2] or stdin, runs it with ioredis (one
// client, i.e. one connection, per `connections`, all concurrent on the event
// loop), prints one result (JSON) on stdout. Fields and semantics:
// docs/lab.md, "Client drivers"; the command generator is the same in
// redis_py_driver.py and clients.rs.
//
// Timing: the clock starts right before `call()` / `pipeline().exec()` (the
// socket write happens synchronously inside) and stops when the promise
// settles, so it includes the event loop's turn.
// read_delay_ms: the socket is paused (`stream.pause()`) right after the
// write and resumed after the delay: the replies wait in the kernel's receive
// buffer, as with a blocking client that reads late.
// timeout_ms: ioredis's `commandTimeout`; on a timeout the client disconnects
// and the next batch opens a new connection.
// Module resolution: NODE_PATH=~/.cache/resptrace/clients/node/node_modules
// (installed by `cargo xtask setup`).

"use strict";

const Redis = require("ioredis");

function commandArgs(name, conn, i, keys, value) {
  const k = i % keys;
  const [s, c, h, l, st, z] = ["str", "ctr", "hash", "list", "set", "zset"].map(
    (p) => `${p}:${conn}:${k}`,
  );
  const table = {
    PING: [],
    GET: [s],
    SET: [s, value],
    DEL: [s],
    EXISTS: [s],
    INCR: [c],
    DECR: [c],
    HSET: [h, "field", value],
    HGET: [h, "field"],
    HGETALL: [h],
    LPUSH: [l, value],
    RPUSH: [l, value],
    LPOP: [l],
    RPOP: [l],
    LRANGE: [l, "0", "9"],
    SADD: [st, value],
    SMEMBERS: [st],
    ZADD: [z, "1", value],
  };
  if (!(name in table)) {
    throw new Error(`ioredis_driver: no generator for command ${name}`);
  }
  return [name, ...table[name]];
}

const TIMED_OUT = "Command timed out";

// Resumes `stream` once the clock passed `deadline` (ns): libuv timers may
// fire up to a millisecond early (the loop's cached time).
function resumeAfter(stream, deadline) {
  const left = deadline - process.hrtime.bigint();
  if (left <= 0n) {
    stream.resume();
  } else {
    setTimeout(() => resumeAfter(stream, deadline), Math.max(1, Math.ceil(Number(left) / 1e6)));
  }
}

class Worker {
  constructor(index, w) {
    this.index = index;
    this.w = w;
    this.counts = {};
    this.errors = {};
    this.timeouts = 0;
    this.latencies = {};
    this.redis = null;
  }

  async connect() {
    const options = {
      host: this.w.host,
      port: this.w.port,
      lazyConnect: true,
      enableReadyCheck: false,
      disableClientInfo: true,
      enableOfflineQueue: false,
      autoResendUnfulfilledCommands: false,
      maxRetriesPerRequest: 0,
      retryStrategy: () => null,
      connectTimeout: 10000,
    };
    if (this.w.timeout_ms != null) {
      options.commandTimeout = this.w.timeout_ms;
    }
    if (this.w.tls_ca != null) {
      // Trust the lab's CA; the certificate names the server by IP.
      options.tls = {
        ca: require("fs").readFileSync(this.w.tls_ca),
        checkServerIdentity: () => undefined,
      };
    }
    this.redis = new Redis(options);
    this.redis.on("error", () => {}); // reported per command
    await this.redis.connect();
  }

  bump(map, key, n = 1) {
    map[key] = (map[key] || 0) + n;
  }

  // Sends `commands` (arrays) in one write, awaits their replies.
  async batch(commands) {
    if (this.redis === null) {
      await this.connect();
    }
    const redis = this.redis;
    const names = commands.map((c) => String(c[0]).toUpperCase());
    const delay = this.w.read_delay_ms || 0;
    let settled;
    const start = process.hrtime.bigint();
    if (commands.length === 1) {
      const [name, ...args] = commands[0];
      settled = redis.call(name, ...args).then(
        (reply) => [[null, reply]],
        (err) => [[err, null]],
      );
    } else {
      const pipeline = redis.pipeline();
      for (const [name, ...args] of commands) {
        pipeline.call(name, ...args);
      }
      settled = pipeline.exec().catch((err) => commands.map(() => [err, null]));
    }
    // The write happened synchronously above.
    for (const name of names) this.bump(this.counts, name);
    if (delay > 0) {
      redis.stream.pause();
      resumeAfter(redis.stream, start + BigInt(delay) * 1000000n);
    }
    const results = await settled;
    const elapsedUs = Number((process.hrtime.bigint() - start) / 1000n);
    let lost = false;
    results.forEach(([err]) => {
      if (!err) return;
      const message = String(err.message || err);
      if (message === TIMED_OUT) {
        this.timeouts += 1;
        lost = true;
      } else if (err.name === "ReplyError") {
        this.bump(this.errors, message.split(" ")[0] || "ERR");
      } else {
        this.bump(this.errors, "CONNECTION");
        lost = true;
      }
    });
    if (lost) {
      redis.disconnect();
      this.redis = null;
      return;
    }
    for (const name of names) {
      (this.latencies[name] = this.latencies[name] || []).push(elapsedUs);
    }
  }

  async run() {
    const w = this.w;
    await this.connect();
    for (const raw of w.raw || []) {
      await this.batch([raw.map(String)]);
    }
    const value = "x".repeat(w.value_size ?? 16);
    const commands = (w.commands || ["PING"]).map((c) => c.toUpperCase());
    const keys = w.keys ?? 100;
    const pipeline = Math.max(1, w.pipeline ?? 1);
    const requests = w.requests ?? 0;
    for (let i = 0; i < requests; ) {
      const n = Math.min(pipeline, requests - i);
      const batch = [];
      for (let j = 0; j < n; j++) {
        batch.push(commandArgs(commands[(i + j) % commands.length], this.index, i + j, keys, value));
      }
      await this.batch(batch);
      i += n;
    }
    if (this.redis !== null) {
      this.redis.disconnect(); // closes the socket, like redis-py (no QUIT)
    }
  }
}

async function readInput() {
  if (process.argv.length > 2) return process.argv[2];
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

async function main() {
  const w = JSON.parse(await readInput());
  const workers = [];
  for (let i = 0; i < (w.connections ?? 1); i++) workers.push(new Worker(i, w));
  const start = process.hrtime.bigint();
  await Promise.all(
    workers.map((worker) =>
      worker.run().catch((err) => {
        throw new Error(`connection ${worker.index}: ${err.stack || err}`);
      }),
    ),
  );
  const totalUs = Number((process.hrtime.bigint() - start) / 1000n);
  const result = { counts: {}, errors: {}, timeouts: 0, latencies_us: {}, total_us: totalUs };
  for (const worker of workers) {
    for (const [k, n] of Object.entries(worker.counts)) result.counts[k] = (result.counts[k] || 0) + n;
    for (const [k, n] of Object.entries(worker.errors)) result.errors[k] = (result.errors[k] || 0) + n;
    result.timeouts += worker.timeouts;
    for (const [k, v] of Object.entries(worker.latencies)) {
      (result.latencies_us[k] = result.latencies_us[k] || []).push(...v);
    }
  }
  process.stdout.write(JSON.stringify(result) + "\n");
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`ioredis_driver: ${err.stack || err}\n`);
    process.exit(1);
  },
);
