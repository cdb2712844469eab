//! Kernel struct layouts from the kernel's own BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The few kernel struct fields the programs read (none on the hot path) are
//! located here at start, so nothing is read at an offset fixed at build
//! time: this is CO-RE done by hand, because aya's Rust programs get no
//! relocations. Only what that needs is parsed: type records are walked to
//! find a named struct and the byte offset of a (possibly nested, anonymous)
//! member. aya-obj parses BTF too but keeps its type accessors crate-private.

use std::path::Path;

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not BTF, or a BTF this reader does not know: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct {0}")]
    MissingStruct(String),
    #[error("kernel BTF: struct {owner} has no member {member}")]
    MissingMember { owner: String, member: String },
}

/// One type record: kind, name, size-or-type, and its members (structs and
/// unions only: name offset, type id, bit offset).
struct Type {
    kind: u32,
    name: u32,
    size_or_type: u32,
    members: Vec<(u32, u32, u32)>,
}

/// The types and strings of one BTF blob.
pub struct Btf {
    /// Index = type id; id 0 is `void`.
    types: Vec<Type>,
    strings: Vec<u8>,
}

impl Btf {
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses native-endian BTF (what the running kernel exposes).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u16_at = |at: usize| {
            data.get(at..at + 2)
                .map(|b| u16::from_ne_bytes([b[0], b[1]]))
        };
        let u32_at = |at: usize| {
            data.get(at..at + 4)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        };
        if u16_at(0) != Some(MAGIC) {
            return Err(BtfError::Malformed("bad magic"));
        }
        let header = |at| {
            u32_at(at)
                .map(|v| v as usize)
                .ok_or(BtfError::Malformed("short header"))
        };
        let (header_len, type_off, type_len) = (header(4)?, header(8)?, header(12)?);
        let (str_off, str_len) = (header(16)?, header(20)?);
        let strings = data
            .get(header_len + str_off..header_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();

        let mut types = vec![Type {
            kind: 0,
            name: 0,
            size_or_type: 0,
            members: Vec::new(),
        }];
        let (mut at, end) = (header_len + type_off, header_len + type_off + type_len);
        while at < end {
            let truncated = BtfError::Malformed("truncated type");
            let (name, info, size_or_type) = match (u32_at(at), u32_at(at + 4), u32_at(at + 8)) {
                (Some(n), Some(i), Some(s)) => (n, i, s),
                _ => return Err(truncated),
            };
            at += 12;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let mut members = Vec::new();
            let trailing = match kind {
                1 | 14 | 17 => 4, // INT, VAR, DECL_TAG
                3 => 12,          // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    let kind_flag = info >> 31 == 1;
                    for m in 0..vlen {
                        let base = at + m * 12;
                        let (Some(m_name), Some(m_type), Some(m_offset)) =
                            (u32_at(base), u32_at(base + 4), u32_at(base + 8))
                        else {
                            return Err(truncated);
                        };
                        // With kind_flag, the top 8 bits are a bitfield size.
                        let bits = if kind_flag {
                            m_offset & 0xff_ffff
                        } else {
                            m_offset
                        };
                        members.push((m_name, m_type, bits));
                    }
                    vlen * 12
                }
                6 | 13 => vlen * 8,        // ENUM, FUNC_PROTO
                15 | 19 => vlen * 12,      // DATASEC, ENUM64
                2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF…FUNC, FLOAT, TYPE_TAG
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            at += trailing;
            types.push(Type {
                kind,
                name,
                size_or_type,
                members,
            });
        }
        Ok(Self { types, strings })
    }

    fn name(&self, offset: u32) -> &[u8] {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let ty = self.types.get(id as usize)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type
                }
                _ => return Some(ty),
            }
        }
        None
    }

    /// Byte offset of `member` in `struct owner`, looking inside anonymous
    /// structs and unions (`struct tcp_skb_cb`'s `tcp_gso_segs` is in one).
    pub fn member_offset(&self, owner: &str, member: &str) -> Result<u32, BtfError> {
        // A struct with members: forward declarations have none.
        let ty = self
            .types
            .iter()
            .find(|t| {
                t.kind == KIND_STRUCT
                    && !t.members.is_empty()
                    && self.name(t.name) == owner.as_bytes()
            })
            .ok_or_else(|| BtfError::MissingStruct(owner.into()))?;
        self.find_member(ty, member.as_bytes(), 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::MissingMember {
                owner: owner.into(),
                member: member.into(),
            })
    }

    fn find_member(&self, ty: &Type, member: &[u8], depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        for &(name, type_id, bits) in &ty.members {
            if self.name(name) == member {
                return Some(bits);
            }
            if name == 0 {
                let inner = self.resolve(type_id)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                    && let Some(found) = self.find_member(inner, member, depth + 1)
                {
                    return Some(bits + found);
                }
            }
        }
        None
    }
}

/// Where the programs find a retransmitted skb's segment count:
/// `TCP_SKB_CB(skb)->tcp_gso_segs`, i.e. `skb->cb` + `tcp_skb_cb.tcp_gso_segs`.
pub fn skb_tcp_gso_segs(btf: &Btf) -> Result<u16, BtfError> {
    offset_u16(
        btf.member_offset("sk_buff", "cb")? + btf.member_offset("tcp_skb_cb", "tcp_gso_segs")?,
    )
}

/// Where the programs find the kernel's own retransmit count of a socket:
/// `tcp_sock.total_retrans`, behind `tcpi_total_retrans`.
pub fn tcp_sock_total_retrans(btf: &Btf) -> Result<u16, BtfError> {
    offset_u16(btf.member_offset("tcp_sock", "total_retrans")?)
}

/// The programs take offsets as u16 (kernel structs stay well below 64 KiB).
fn offset_u16(offset: u32) -> Result<u16, BtfError> {
    u16::try_from(offset).map_err(|_| BtfError::Malformed("offset beyond 64 KiB"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: `struct inner { u16 a; u16 b; }`, `typedef struct inner t;`,
    /// `struct outer { u32 x; <anonymous union { u32 y; t; }> at 64; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0inner\0a\0b\0t\0outer\0x\0y\0u16\0".to_vec();
        let name = |s: &str| {
            let needle = format!("\0{s}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            words
                .iter()
                .for_each(|w| types.extend_from_slice(&w.to_ne_bytes()))
        };
        // 1: INT u16
        push(&[name("u16"), 1 << 24, 2, 16]);
        // 2: struct inner { a at 0, b at 16 bits }
        push(&[
            name("inner"),
            (KIND_STRUCT << 24) | 2,
            4,
            name("a"),
            1,
            0,
            name("b"),
            1,
            16,
        ]);
        // 3: typedef t -> 2
        push(&[name("t"), KIND_TYPEDEF << 24, 2]);
        // 4: anonymous union { y: int; anonymous t }
        push(&[0, (KIND_UNION << 24) | 2, 4, name("y"), 1, 0, 0, 3, 0]);
        // 5: forward-declared outer (no members) then the real one (6)
        push(&[name("outer"), 7 << 24, 0]);
        push(&[
            name("outer"),
            (KIND_STRUCT << 24) | 2,
            12,
            name("x"),
            1,
            0,
            0,
            4,
            64,
        ]);
        let mut out = Vec::new();
        for word in [
            u32::from(MAGIC) | (1 << 16),
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&word.to_ne_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_members_inside_anonymous_unions_and_typedefs() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.member_offset("outer", "x").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "y").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "b").unwrap(), 10);
        assert_eq!(btf.member_offset("inner", "b").unwrap(), 2);
        assert!(matches!(
            btf.member_offset("outer", "z"),
            Err(BtfError::MissingMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("nope", "x"),
            Err(BtfError::MissingStruct(_))
        ));
    }

    #[test]
    fn rejects_truncated_and_foreign_data() {
        let data = blob();
        for cut in [0, 3, 20, 30, data.len() - 40] {
            assert!(Btf::parse(&data[..cut]).is_err(), "cut at {cut}");
        }
        assert!(Btf::parse(b"\x7fELF and more bytes here....").is_err());
    }

    /// The running kernel's BTF, where it exists: the offsets are within
    /// their structs (`cb` is 48 bytes, `tcp_gso_segs` near its start;
    /// `tcp_sock` begins with an `inet_connection_sock` of 1 KiB and more).
    #[test]
    fn reads_this_kernels_skb_and_socket_layout() {
        let path = Path::new(crate::preflight::VMLINUX_BTF);
        if !path.exists() {
            return;
        }
        let btf = Btf::from_file(path).unwrap();
        let cb = btf.member_offset("sk_buff", "cb").unwrap();
        let segs = btf.member_offset("tcp_skb_cb", "tcp_gso_segs").unwrap();
        assert!((1..256).contains(&cb), "sk_buff.cb at {cb}");
        assert!((8..48).contains(&segs), "tcp_skb_cb.tcp_gso_segs at {segs}");
        assert_eq!(u32::from(skb_tcp_gso_segs(&btf).unwrap()), cb + segs);
        let total_retrans = tcp_sock_total_retrans(&btf).unwrap();
        assert!(
            (1024..8192).contains(&total_retrans),
            "tcp_sock.total_retrans at {total_retrans}"
        );
    }
}
