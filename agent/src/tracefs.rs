//! Tracepoint record layouts, read from tracefs at startup.
//!
//! Tracepoint fields move between kernels (`tcp_retransmit_skb` gained
//! `family` in 5.16, shifting every address after it), so the kernel programs
//! never hard-code an offset: userspace reads each tracepoint's `format` file
//! and passes the offsets in as load-time settings.

use std::{
    fs,
    path::{Path, PathBuf},
};

/// Where tracefs is usually mounted, newest convention first.
pub const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error("tracepoint {category}/{name} not found in this kernel ({path})")]
    MissingTracepoint {
        category: String,
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tracepoint {tracepoint} has no field `{field}`")]
    MissingField { tracepoint: String, field: String },
    #[error("tracepoint {tracepoint}: field `{field}` has size {size}, expected {expected}")]
    FieldSize {
        tracepoint: String,
        field: String,
        size: usize,
        expected: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u16,
    pub size: usize,
}

/// The fields of one tracepoint's record.
#[derive(Debug, Clone)]
pub struct TracepointFormat {
    pub tracepoint: String,
    pub fields: Vec<Field>,
}

impl TracepointFormat {
    pub fn read(root: &Path, category: &str, name: &str) -> Result<Self, TracefsError> {
        let path = root.join("events").join(category).join(name).join("format");
        let text = fs::read_to_string(&path).map_err(|source| TracefsError::MissingTracepoint {
            category: category.into(),
            name: name.into(),
            path: path.clone(),
            source,
        })?;
        Ok(Self::parse(&format!("{category}/{name}"), &text))
    }

    /// Parses the `field:<decl>; offset:<n>; size:<n>; signed:<n>;` lines of a
    /// `format` file; lines of any other shape are skipped.
    pub fn parse(tracepoint: &str, text: &str) -> Self {
        let fields = text.lines().filter_map(parse_field_line).collect();
        Self {
            tracepoint: tracepoint.into(),
            fields,
        }
    }

    /// Offset of `field`, checking that it has the size the programs read.
    pub fn offset(&self, field: &str, expected_size: usize) -> Result<u16, TracefsError> {
        let found = self
            .fields
            .iter()
            .find(|f| f.name == field)
            .ok_or_else(|| TracefsError::MissingField {
                tracepoint: self.tracepoint.clone(),
                field: field.into(),
            })?;
        if found.size != expected_size {
            return Err(TracefsError::FieldSize {
                tracepoint: self.tracepoint.clone(),
                field: field.into(),
                size: found.size,
                expected: expected_size,
            });
        }
        Ok(found.offset)
    }
}

fn parse_field_line(line: &str) -> Option<Field> {
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    for part in line.trim().split(';') {
        let part = part.trim();
        if let Some(value) = part.strip_prefix("field:") {
            decl = Some(value.trim());
        } else if let Some(value) = part.strip_prefix("offset:") {
            offset = value.trim().parse::<u16>().ok();
        } else if let Some(value) = part.strip_prefix("size:") {
            size = value.trim().parse::<usize>().ok();
        }
    }
    // The name is the declaration's last word, without an array suffix:
    // `const void * skaddr`, `__u8 saddr_v6[16]`.
    let name = decl?.rsplit([' ', '*']).next()?;
    let name = name.split('[').next()?.trim();
    if name.is_empty() {
        return None;
    }
    Some(Field {
        name: name.into(),
        offset: offset?,
        size: size?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tcp/tcp_retransmit_skb` on 5.10: no `family`, so `saddr` sits at 32.
    const RETRANSMIT_5_10: &str = "name: tcp_retransmit_skb
ID: 1234
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"skbaddr=%p\"
";

    #[test]
    fn parses_offsets_and_sizes() {
        let format = TracepointFormat::parse("tcp/tcp_retransmit_skb", RETRANSMIT_5_10);
        assert_eq!(format.offset("skaddr", 8).unwrap(), 16);
        assert_eq!(format.offset("state", 4).unwrap(), 24);
        assert_eq!(format.offset("saddr", 4).unwrap(), 32);
        assert_eq!(format.offset("daddr_v6", 16).unwrap(), 56);
        assert_eq!(format.offset("common_type", 2).unwrap(), 0);
    }

    #[test]
    fn missing_field_and_wrong_size_are_errors() {
        let format = TracepointFormat::parse("tcp/tcp_retransmit_skb", RETRANSMIT_5_10);
        assert!(matches!(
            format.offset("family", 2),
            Err(TracefsError::MissingField { .. })
        ));
        assert!(matches!(
            format.offset("state", 8),
            Err(TracefsError::FieldSize { size: 4, .. })
        ));
    }

    #[test]
    fn reads_this_kernels_inet_sock_set_state() {
        let Some(root) = TRACEFS_ROOTS
            .iter()
            .map(Path::new)
            .find(|root| root.join("events").is_dir())
        else {
            eprintln!("skipped: tracefs is not mounted");
            return;
        };
        let format = TracepointFormat::read(root, "sock", "inet_sock_set_state").unwrap();
        assert!(format.offset("skaddr", 8).is_ok());
        assert!(format.offset("daddr_v6", 16).is_ok());
    }
}
