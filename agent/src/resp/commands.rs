//! Command names as data: Redis 7.4 / Valkey 8 top-level commands and the
//! subcommands of container commands. Names reported by the parser come only
//! from these tables, so a client cannot inject strings (or unbounded metric
//! cardinality) through a command name. Both lists are sorted for binary
//! search (a test checks it).

/// Top-level command names, uppercase, sorted.
pub(super) static COMMANDS: &[&str] = &[
    "ACL",
    "APPEND",
    "ASKING",
    "AUTH",
    "BGREWRITEAOF",
    "BGSAVE",
    "BITCOUNT",
    "BITFIELD",
    "BITFIELD_RO",
    "BITOP",
    "BITPOS",
    "BLMOVE",
    "BLMPOP",
    "BLPOP",
    "BRPOP",
    "BRPOPLPUSH",
    "BZMPOP",
    "BZPOPMAX",
    "BZPOPMIN",
    "CLIENT",
    "CLUSTER",
    "COMMAND",
    "CONFIG",
    "COPY",
    "DBSIZE",
    "DEBUG",
    "DECR",
    "DECRBY",
    "DEL",
    "DISCARD",
    "DUMP",
    "ECHO",
    "EVAL",
    "EVALSHA",
    "EVALSHA_RO",
    "EVAL_RO",
    "EXEC",
    "EXISTS",
    "EXPIRE",
    "EXPIREAT",
    "EXPIRETIME",
    "FAILOVER",
    "FCALL",
    "FCALL_RO",
    "FLUSHALL",
    "FLUSHDB",
    "FUNCTION",
    "GEOADD",
    "GEODIST",
    "GEOHASH",
    "GEOPOS",
    "GEORADIUS",
    "GEORADIUSBYMEMBER",
    "GEORADIUSBYMEMBER_RO",
    "GEORADIUS_RO",
    "GEOSEARCH",
    "GEOSEARCHSTORE",
    "GET",
    "GETBIT",
    "GETDEL",
    "GETEX",
    "GETRANGE",
    "GETSET",
    "HDEL",
    "HELLO",
    "HEXISTS",
    "HEXPIRE",
    "HEXPIREAT",
    "HEXPIRETIME",
    "HGET",
    "HGETALL",
    "HGETDEL",
    "HGETEX",
    "HINCRBY",
    "HINCRBYFLOAT",
    "HKEYS",
    "HLEN",
    "HMGET",
    "HMSET",
    "HPERSIST",
    "HPEXPIRE",
    "HPEXPIREAT",
    "HPEXPIRETIME",
    "HPTTL",
    "HRANDFIELD",
    "HSCAN",
    "HSET",
    "HSETEX",
    "HSETNX",
    "HSTRLEN",
    "HTTL",
    "HVALS",
    "INCR",
    "INCRBY",
    "INCRBYFLOAT",
    "INFO",
    "KEYS",
    "LASTSAVE",
    "LATENCY",
    "LCS",
    "LINDEX",
    "LINSERT",
    "LLEN",
    "LMOVE",
    "LMPOP",
    "LOLWUT",
    "LPOP",
    "LPOS",
    "LPUSH",
    "LPUSHX",
    "LRANGE",
    "LREM",
    "LSET",
    "LTRIM",
    "MEMORY",
    "MGET",
    "MIGRATE",
    "MODULE",
    "MONITOR",
    "MOVE",
    "MSET",
    "MSETNX",
    "MULTI",
    "OBJECT",
    "PERSIST",
    "PEXPIRE",
    "PEXPIREAT",
    "PEXPIRETIME",
    "PFADD",
    "PFCOUNT",
    "PFDEBUG",
    "PFMERGE",
    "PFSELFTEST",
    "PING",
    "PSETEX",
    "PSUBSCRIBE",
    "PSYNC",
    "PTTL",
    "PUBLISH",
    "PUBSUB",
    "PUNSUBSCRIBE",
    "QUIT",
    "RANDOMKEY",
    "READONLY",
    "READWRITE",
    "RENAME",
    "RENAMENX",
    "REPLCONF",
    "REPLICAOF",
    "RESET",
    "RESTORE",
    "RESTORE-ASKING",
    "ROLE",
    "RPOP",
    "RPOPLPUSH",
    "RPUSH",
    "RPUSHX",
    "SADD",
    "SAVE",
    "SCAN",
    "SCARD",
    "SCRIPT",
    "SDIFF",
    "SDIFFSTORE",
    "SELECT",
    "SET",
    "SETBIT",
    "SETEX",
    "SETNX",
    "SETRANGE",
    "SHUTDOWN",
    "SINTER",
    "SINTERCARD",
    "SINTERSTORE",
    "SISMEMBER",
    "SLAVEOF",
    "SLOWLOG",
    "SMEMBERS",
    "SMISMEMBER",
    "SMOVE",
    "SORT",
    "SORT_RO",
    "SPOP",
    "SPUBLISH",
    "SRANDMEMBER",
    "SREM",
    "SSCAN",
    "SSUBSCRIBE",
    "STRLEN",
    "SUBSCRIBE",
    "SUBSTR",
    "SUNION",
    "SUNIONSTORE",
    "SUNSUBSCRIBE",
    "SWAPDB",
    "SYNC",
    "TIME",
    "TOUCH",
    "TTL",
    "TYPE",
    "UNLINK",
    "UNSUBSCRIBE",
    "UNWATCH",
    "WAIT",
    "WAITAOF",
    "WATCH",
    "XACK",
    "XADD",
    "XAUTOCLAIM",
    "XCLAIM",
    "XDEL",
    "XGROUP",
    "XINFO",
    "XLEN",
    "XPENDING",
    "XRANGE",
    "XREAD",
    "XREADGROUP",
    "XREVRANGE",
    "XSETID",
    "XTRIM",
    "ZADD",
    "ZCARD",
    "ZCOUNT",
    "ZDIFF",
    "ZDIFFSTORE",
    "ZINCRBY",
    "ZINTER",
    "ZINTERCARD",
    "ZINTERSTORE",
    "ZLEXCOUNT",
    "ZMPOP",
    "ZMSCORE",
    "ZPOPMAX",
    "ZPOPMIN",
    "ZRANDMEMBER",
    "ZRANGE",
    "ZRANGEBYLEX",
    "ZRANGEBYSCORE",
    "ZRANGESTORE",
    "ZRANK",
    "ZREM",
    "ZREMRANGEBYLEX",
    "ZREMRANGEBYRANK",
    "ZREMRANGEBYSCORE",
    "ZREVRANGE",
    "ZREVRANGEBYLEX",
    "ZREVRANGEBYSCORE",
    "ZREVRANK",
    "ZSCAN",
    "ZSCORE",
    "ZUNION",
    "ZUNIONSTORE",
];

/// Container commands (reported as `CONTAINER SUB`) and their subcommands,
/// both sorted.
pub(super) static CONTAINERS: &[(&str, &[&str])] = &[
    (
        "ACL",
        &[
            "CAT", "DELUSER", "DRYRUN", "GENPASS", "GETUSER", "HELP", "LIST", "LOAD", "LOG",
            "SAVE", "SETUSER", "USERS", "WHOAMI",
        ],
    ),
    (
        "CLIENT",
        &[
            "CACHING",
            "CAPA",
            "GETNAME",
            "GETREDIR",
            "HELP",
            "ID",
            "INFO",
            "KILL",
            "LIST",
            "NO-EVICT",
            "NO-TOUCH",
            "PAUSE",
            "REPLY",
            "SETINFO",
            "SETNAME",
            "TRACKING",
            "TRACKINGINFO",
            "UNBLOCK",
            "UNPAUSE",
        ],
    ),
    (
        "CLUSTER",
        &[
            "ADDSLOTS",
            "ADDSLOTSRANGE",
            "BUMPEPOCH",
            "COUNT-FAILURE-REPORTS",
            "COUNTKEYSINSLOT",
            "DELSLOTS",
            "DELSLOTSRANGE",
            "FAILOVER",
            "FLUSHSLOTS",
            "FORGET",
            "GETKEYSINSLOT",
            "HELP",
            "INFO",
            "KEYSLOT",
            "LINKS",
            "MEET",
            "MYID",
            "MYSHARDID",
            "NODES",
            "REPLICAS",
            "REPLICATE",
            "RESET",
            "SAVECONFIG",
            "SET-CONFIG-EPOCH",
            "SETSLOT",
            "SHARDS",
            "SLAVES",
            "SLOTS",
        ],
    ),
    (
        "COMMAND",
        &[
            "COUNT",
            "DOCS",
            "GETKEYS",
            "GETKEYSANDFLAGS",
            "HELP",
            "INFO",
            "LIST",
        ],
    ),
    ("CONFIG", &["GET", "HELP", "RESETSTAT", "REWRITE", "SET"]),
    (
        "DEBUG",
        &[
            "ASSERT",
            "CHANGE-REPL-ID",
            "DIGEST",
            "DIGEST-VALUE",
            "HELP",
            "JMAP",
            "LEAK",
            "LISTPACK",
            "LOG",
            "OBJECT",
            "OOM",
            "PANIC",
            "POPULATE",
            "PROTOCOL",
            "QUICKLIST-PACKED-THRESHOLD",
            "RELOAD",
            "REPLYBUFFER",
            "RESTART",
            "SDSLEN",
            "SEGFAULT",
            "SET-ACTIVE-EXPIRE",
            "SLEEP",
            "STRINGMATCH-LEN",
            "STRUCTSIZE",
        ],
    ),
    (
        "FUNCTION",
        &[
            "DELETE", "DUMP", "FLUSH", "HELP", "KILL", "LIST", "LOAD", "RESTORE", "STATS",
        ],
    ),
    (
        "LATENCY",
        &[
            "DOCTOR",
            "GRAPH",
            "HELP",
            "HISTOGRAM",
            "HISTORY",
            "LATEST",
            "RESET",
        ],
    ),
    (
        "MEMORY",
        &["DOCTOR", "HELP", "MALLOC-STATS", "PURGE", "STATS", "USAGE"],
    ),
    ("MODULE", &["HELP", "LIST", "LOAD", "LOADEX", "UNLOAD"]),
    (
        "OBJECT",
        &["ENCODING", "FREQ", "HELP", "IDLETIME", "REFCOUNT"],
    ),
    (
        "PUBSUB",
        &[
            "CHANNELS",
            "HELP",
            "NUMPAT",
            "NUMSUB",
            "SHARDCHANNELS",
            "SHARDNUMSUB",
        ],
    ),
    (
        "SCRIPT",
        &["DEBUG", "EXISTS", "FLUSH", "HELP", "KILL", "LOAD"],
    ),
    ("SLOWLOG", &["GET", "HELP", "LEN", "RESET"]),
    (
        "XGROUP",
        &[
            "CREATE",
            "CREATECONSUMER",
            "DELCONSUMER",
            "DESTROY",
            "HELP",
            "SETID",
        ],
    ),
    ("XINFO", &["CONSUMERS", "GROUPS", "HELP", "STREAM"]),
];

/// The longest name in either table; longer arguments are not commands.
const MAX_NAME: usize = 32;

/// Names by their uppercase bytes. Every request's name goes through here:
/// hash maps, not binary searches of string comparisons (which were a tenth,
/// then a fifth, of the agent's CPU).
type Index<V> = std::collections::HashMap<&'static [u8], V, rustc_hash::FxBuildHasher>;

struct Indexes {
    /// Every command, with its subcommands' index if it is a container.
    commands: Index<(&'static str, Option<Index<&'static str>>)>,
}

fn indexes() -> &'static Indexes {
    static INDEXES: std::sync::OnceLock<Indexes> = std::sync::OnceLock::new();
    INDEXES.get_or_init(|| {
        let subcommands = |name: &str| {
            let i = CONTAINERS.binary_search_by(|(c, _)| (*c).cmp(name)).ok()?;
            Some(
                CONTAINERS[i]
                    .1
                    .iter()
                    .map(|sub| (sub.as_bytes(), *sub))
                    .collect(),
            )
        };
        Indexes {
            commands: COMMANDS
                .iter()
                .map(|name| (name.as_bytes(), (*name, subcommands(name))))
                .collect(),
        }
    })
}

/// Case-insensitive lookup of `word` in `index`; `None` for anything else.
fn find<'i, V>(index: &'i Index<V>, word: &[u8]) -> Option<&'i V> {
    let mut upper = [0u8; MAX_NAME];
    let upper = upper.get_mut(..word.len())?;
    for (u, b) in upper.iter_mut().zip(word) {
        *u = b.to_ascii_uppercase();
    }
    index.get(&*upper)
}

/// The command named by a request's first two arguments: `None` when the
/// first is not a known command. A container with a missing or unknown
/// subcommand is reported by its own name.
pub(super) fn lookup(arg0: &[u8], arg1: Option<&[u8]>) -> Option<super::Command> {
    lookup_entry(arg0, arg1).map(|(command, _)| command)
}

/// [`lookup`], and whether the command is a container.
fn lookup_entry(arg0: &[u8], arg1: Option<&[u8]>) -> Option<(super::Command, bool)> {
    let (name, subs) = find(&indexes().commands, arg0)?;
    let sub = subs
        .as_ref()
        .zip(arg1)
        .and_then(|(subs, arg1)| find(subs, arg1).copied());
    Some((super::Command { name, sub }, subs.is_some()))
}

/// The last plain (not container) command a connection named, by its bytes
/// as sent: a client mostly repeats its commands (a pipeline of `GET`s), and
/// comparing a few bytes is cheaper than the index.
#[derive(Debug, Default)]
pub(super) struct LastName {
    bytes: [u8; 16],
    len: usize,
    command: Option<super::Command>,
}

/// [`lookup`], answered from `last` when `arg0` is its bytes.
pub(super) fn lookup_again(
    last: &mut LastName,
    arg0: &[u8],
    arg1: Option<&[u8]>,
) -> Option<super::Command> {
    if let Some(command) = last.command
        && last.len == arg0.len()
        && last.bytes[..last.len] == *arg0
    {
        return Some(command);
    }
    let (command, container) = lookup_entry(arg0, arg1)?;
    if !container && let Some(bytes) = last.bytes.get_mut(..arg0.len()) {
        bytes.copy_from_slice(arg0);
        last.len = arg0.len();
        last.command = Some(command);
    }
    Some(command)
}

/// The command named by fixed-size copies of the first two arguments
/// (NUL-padded, at most `len` bytes kept): names cut at `len` bytes are
/// completed from the table when only one command starts so.
#[cfg(test)]
pub(crate) fn lookup_kept(arg0: &[u8], arg1: &[u8], len: usize) -> Option<super::Command> {
    let trim = |b: &[u8]| -> usize { b.iter().position(|&c| c == 0).unwrap_or(b.len()) };
    let (arg0, arg1) = (&arg0[..trim(arg0)], &arg1[..trim(arg1)]);
    let arg1 = (!arg1.is_empty()).then_some(arg1);
    if let Some(command) = lookup(arg0, arg1) {
        return Some(command);
    }
    if arg0.len() < len {
        return None;
    }
    let mut candidates = COMMANDS
        .iter()
        .filter(|name| name.len() > len && name.as_bytes()[..len].eq_ignore_ascii_case(arg0));
    let name = candidates.next()?;
    if candidates.next().is_some() {
        return None;
    }
    lookup(name.as_bytes(), arg1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_name_is_answered_from_the_last_one_containers_never() {
        let mut last = LastName::default();
        for (arg0, arg1) in [
            (&b"get"[..], None),
            (b"get", None),
            (b"GET", None),
            (b"client", Some(&b"setname"[..])),
            (b"client", Some(b"getname")),
            (b"client", None),
            (b"get", None),
            (b"GETT", None),
            (b"get", None),
        ] {
            assert_eq!(
                lookup_again(&mut last, arg0, arg1),
                lookup(arg0, arg1),
                "{arg0:?}"
            );
        }
    }

    #[test]
    fn kept_names_are_completed_when_unambiguous() {
        let kept = |s: &str| {
            let mut a = [0u8; 16];
            let n = s.len().min(16);
            a[..n].copy_from_slice(&s.as_bytes()[..n]);
            a
        };
        let get = lookup_kept(&kept("GET"), &kept(""), 16).unwrap();
        assert_eq!(get.to_string(), "GET");
        // Cut at 16 bytes, two commands start so: not guessed.
        assert!(lookup_kept(&kept("GEORADIUSBYMEMBER_RO"), &kept(""), 16).is_none());
        let full = lookup_kept(&kept("ZREVRANGEBYSCORE"), &kept(""), 16).unwrap();
        assert_eq!(full.to_string(), "ZREVRANGEBYSCORE");
        let setname = lookup_kept(&kept("CLIENT"), &kept("SETNAME"), 16).unwrap();
        assert_eq!(setname.to_string(), "CLIENT SETNAME");
        assert!(lookup_kept(&kept("mykey"), &kept(""), 16).is_none());
    }

    #[test]
    fn tables_are_sorted_uppercase_and_short() {
        assert!(COMMANDS.windows(2).all(|w| w[0] < w[1]));
        assert!(CONTAINERS.windows(2).all(|w| w[0].0 < w[1].0));
        for (container, subs) in CONTAINERS {
            assert!(COMMANDS.contains(container), "{container}");
            assert!(subs.windows(2).all(|w| w[0] < w[1]), "{container}");
        }
        let all = COMMANDS
            .iter()
            .chain(CONTAINERS.iter().flat_map(|(_, subs)| subs.iter()));
        for name in all {
            assert!(name.len() <= MAX_NAME, "{name}");
            assert_eq!(name.to_ascii_uppercase(), *name);
        }
    }

    #[test]
    fn lookup_is_case_insensitive_and_names_containers() {
        let get = lookup(b"get", None).unwrap();
        assert_eq!(get.to_string(), "GET");
        let setname = lookup(b"client", Some(b"setName")).unwrap();
        assert_eq!(setname.to_string(), "CLIENT SETNAME");
        assert_eq!(
            (setname.name(), setname.subcommand()),
            ("CLIENT", Some("SETNAME"))
        );
        assert_eq!(
            lookup(b"XINFO", Some(b"stream")).unwrap().to_string(),
            "XINFO STREAM"
        );
        // A key after a plain command is not a subcommand.
        assert_eq!(lookup(b"GET", Some(b"info")).unwrap().to_string(), "GET");
        // Unknown subcommand or none: the container alone.
        assert_eq!(
            lookup(b"CONFIG", Some(b"frobnicate")).unwrap().to_string(),
            "CONFIG"
        );
        assert_eq!(lookup(b"COMMAND", None).unwrap().to_string(), "COMMAND");
        assert!(lookup(b"GETT", None).is_none());
        assert!(lookup(b"", None).is_none());
        assert!(lookup(&[b'A'; 100], None).is_none());
        assert!(lookup(b"G\xffT", None).is_none());
    }
}
