//! Where in a `libssl` file to probe: OpenSSL's internal write and read
//! functions when they can be found for certain, else the public calls.
//!
//! A uprobe traps on a breakpoint; then the instruction it displaced is
//! either emulated by the kernel or single-stepped, a second trap. In
//! Debian's OpenSSL 3.0, `SSL_write` and `SSL_read` begin with
//! `sub $0x18,%rsp`, which is single-stepped: measured here (Linux 6.18 in
//! a VM, redis-benchmark over TLS, client and server both probed) probes on
//! the two calls cut throughput from 116k to 22k requests/s. Each pair of
//! public calls (`SSL_write` and `SSL_write_ex`, `SSL_read` and
//! `SSL_read_ex`) goes through one internal function,
//! `ssl_write_internal(ssl, buf, num, &written)` and its read twin, whose
//! first instruction is a `push` the kernel emulates (recent kernels, this
//! one among them): probed there, 106k requests/s. The arguments are those
//! of the `_ex` calls, so the `_ex` programs serve.
//!
//! Internal functions have no symbols. They are taken only when the code
//! says so without doubt, each direction on its own: an `_ex` call must be a
//! thin wrapper (`[endbr64] sub $n,%rsp; call F`, its arguments passed on
//! untouched), the plain call (`SSL_write`) must call the same `F`, and `F`
//! must begin with a `push` (after an optional `endbr64`, which moves
//! nothing on the stack, so a return probe there still finds the return
//! address on top). OpenSSL 3.3+ (Debian 13's 3.5) writes through
//! `SSL_write_ex2(ssl, buf, num, flags, &written)`: there the wrapper is
//! `SSL_write_ex2`, `F` takes the count's pointer as its fifth argument,
//! and `SSL_write_ex` must be the forwarder to it
//! (`mov %rcx,%r8; xor %ecx,%ecx; jmp`). Any other build (OpenSSL 1.1,
//! LTO, another architecture) keeps the public calls of that direction.

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

/// `endbr64`, first in functions of builds with control-flow protection.
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// OpenSSL 3.3+'s `SSL_write_ex`: `mov %rcx,%r8; xor %ecx,%ecx` (flags 0),
/// then a `jmp`/`call` to `SSL_write_ex2`.
const WRITE_EX_FORWARDER: [u8; 5] = [0x49, 0x89, 0xc8, 0x31, 0xc9];

/// An internal function to probe, and where its count goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InternalCall {
    /// File offset of the probed instruction.
    pub offset: u64,
    /// The argument (from 0) that is the `size_t *` of the bytes moved.
    pub count_arg: u8,
}

/// What was found per direction; `None`: probe the public calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InternalCalls {
    pub write: Option<InternalCall>,
    pub read: Option<InternalCall>,
}

/// The internal write and read functions of the ELF file `data`, each
/// where it can be told for certain.
pub fn find(data: &[u8]) -> InternalCalls {
    let Ok(file) = object::File::parse(data) else {
        return InternalCalls::default();
    };
    if file.architecture() != object::Architecture::X86_64 {
        return InternalCalls::default();
    }
    let write = internal(&file, "SSL_write_ex", "SSL_write", 3).or_else(|| {
        let (_, forwarder) = function(&file, "SSL_write_ex")?;
        forwards_to_write_ex2(forwarder)
            .then(|| internal(&file, "SSL_write_ex2", "SSL_write", 4))?
    });
    InternalCalls {
        write,
        read: internal(&file, "SSL_read_ex", "SSL_read", 3),
    }
}

/// The internal function that `wrapper` passes its arguments to and
/// `other` calls too, with its count's argument.
fn internal(
    file: &object::File<'_>,
    wrapper: &str,
    other: &str,
    count_arg: u8,
) -> Option<InternalCall> {
    let (wrapper_address, wrapper_code) = function(file, wrapper)?;
    let target = wrapper_target(wrapper_code, wrapper_address)?;
    let (other_address, other_code) = function(file, other)?;
    if !calls(other_code, other_address, target) {
        return None;
    }
    let section = file
        .sections()
        .find(|s| (s.address()..s.address() + s.size()).contains(&target))?;
    let code = section
        .data()
        .ok()?
        .get(usize::try_from(target - section.address()).ok()?..)?;
    let entry = push_entry(code)?;
    let (section_offset, _) = section.file_range()?;
    Some(InternalCall {
        offset: section_offset + (target - section.address()) + entry,
        count_arg,
    })
}

/// Address and code of the exported function `name`.
fn function<'data>(file: &object::File<'data>, name: &str) -> Option<(u64, &'data [u8])> {
    let symbol = file
        .dynamic_symbols()
        .find(|s| s.is_definition() && s.name() == Ok(name))?;
    let section = file.section_by_index(symbol.section_index()?).ok()?;
    let start = usize::try_from(symbol.address().checked_sub(section.address())?).ok()?;
    let size = usize::try_from(symbol.size()).ok()?;
    let code = section.data().ok()?.get(start..start.checked_add(size)?)?;
    Some((symbol.address(), code))
}

/// `[endbr64] sub $imm8,%rsp; call rel32` at the start of `code` (at
/// `address`): the call's target. Nothing before the call touches the
/// argument registers, so the target gets the wrapper's arguments.
fn wrapper_target(code: &[u8], address: u64) -> Option<u64> {
    let at = past_endbr64(code);
    if code.get(at..at + 3)? != [0x48, 0x83, 0xec] {
        return None;
    }
    call_target(code, at + 4, address)
}

/// OpenSSL 3.3+'s `SSL_write_ex` (`code`): `[endbr64] mov %rcx,%r8; xor
/// %ecx,%ecx` then a `jmp` or `call` (to `SSL_write_ex2`).
fn forwards_to_write_ex2(code: &[u8]) -> bool {
    let at = past_endbr64(code);
    code.get(at..at + 5) == Some(&WRITE_EX_FORWARDER[..])
        && matches!(code.get(at + 5), Some(0xe9 | 0xe8))
}

/// Where a function's code starts past an `endbr64`.
fn past_endbr64(code: &[u8]) -> usize {
    if code.starts_with(&ENDBR64) { 4 } else { 0 }
}

/// The target of a `call rel32` at `code[at]`, if there is one.
fn call_target(code: &[u8], at: usize, address: u64) -> Option<u64> {
    if *code.get(at)? != 0xe8 {
        return None;
    }
    let rel = i32::from_le_bytes(code.get(at + 1..at + 5)?.try_into().ok()?);
    let next = address.checked_add(u64::try_from(at + 5).ok()?)?;
    next.checked_add_signed(i64::from(rel))
}

/// Whether `code` (at `address`) has a `call rel32` to `target`.
fn calls(code: &[u8], address: u64, target: u64) -> bool {
    (0..code.len()).any(|at| call_target(code, at, address) == Some(target))
}

/// Offset into a function starting with `code` of its first `push`
/// (`push %reg`, `push %r8`…`%r15`), past an `endbr64`; `None` when it
/// does not start so.
fn push_entry(code: &[u8]) -> Option<u64> {
    let at = past_endbr64(code);
    match code.get(at..)? {
        [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..] => Some(at as u64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian 12's libssl 3.0: `SSL_write_ex` at 0x35a10, `SSL_write` at
    /// 0x35980, `ssl_write_internal` at 0x355a0 (objdump).
    const SSL_WRITE_EX: [u8; 16] = [
        0x48, 0x83, 0xec, 0x08, 0xe8, 0x87, 0xfb, 0xff, 0xff, 0x31, 0xd2, 0x85, 0xc0, 0x0f, 0x48,
        0xc2,
    ];
    const SSL_WRITE_CALL: [u8; 8] = [0x48, 0x63, 0xd2, 0xe8, 0xfd, 0xfb, 0xff, 0xff];

    #[test]
    fn a_thin_wrapper_gives_its_callee() {
        assert_eq!(wrapper_target(&SSL_WRITE_EX, 0x35a10), Some(0x355a0));
        let mut with_endbr = ENDBR64.to_vec();
        with_endbr.extend_from_slice(&SSL_WRITE_EX[..12]);
        assert_eq!(wrapper_target(&with_endbr, 0x35a0c), Some(0x355a0));
    }

    #[test]
    fn a_wrapper_that_moves_arguments_is_not_taken() {
        // 3.3+'s `SSL_write_ex`: `mov %rcx,%r8; xor %ecx,%ecx; jmp SSL_write_ex2`.
        let code = [0x49, 0x89, 0xc8, 0x31, 0xc9, 0xe9, 0x00, 0x01, 0x00, 0x00];
        assert_eq!(wrapper_target(&code, 0x1000), None);
        // Debian 13's, at 0x3ee90, is that forwarder.
        let mut debian13 = ENDBR64.to_vec();
        debian13.extend_from_slice(&[0x49, 0x89, 0xc8, 0x31, 0xc9, 0xe9, 0x02, 0x70, 0xfe, 0xff]);
        assert!(forwards_to_write_ex2(&debian13));
        assert!(!forwards_to_write_ex2(&SSL_WRITE_EX));
    }

    #[test]
    fn a_short_wrapper_is_read_whole() {
        // `sub $8,%rsp; call F; add $8,%rsp; ret`: 14 bytes.
        let code = [
            0x48, 0x83, 0xec, 0x08, 0xe8, 0x87, 0xfb, 0xff, 0xff, 0x48, 0x83, 0xc4, 0x08, 0xc3,
        ];
        assert_eq!(wrapper_target(&code, 0x35a10), Some(0x355a0));
    }

    #[test]
    fn the_other_call_must_call_the_same_function() {
        // `movslq %edx,%rdx; call 0x355a0` at 0x3599b.
        assert!(calls(&SSL_WRITE_CALL, 0x3599b, 0x355a0));
        assert!(!calls(&SSL_WRITE_CALL, 0x3599b, 0x355a4));
    }

    #[test]
    fn only_a_push_first_is_probed_and_past_an_endbr64() {
        assert_eq!(push_entry(&[0x41, 0x56, 0x41, 0x55]), Some(0));
        assert_eq!(push_entry(&[0x55, 0x48, 0x89, 0xe5]), Some(0));
        assert_eq!(push_entry(&[0xf3, 0x0f, 0x1e, 0xfa, 0x41, 0x57]), Some(4));
        assert_eq!(push_entry(&[0x48, 0x83, 0xec, 0x18]), None);
        assert_eq!(push_entry(&[0x49, 0x56]), None);
    }

    /// Debian 13's libssl 3.5: `SSL_write_ex2` at 0x3ee60 calls
    /// `ssl_write_internal` at 0x3e8f0 (endbr64 first).
    #[test]
    fn openssl_3_5_write_wrapper_gives_its_callee() {
        let code = [
            0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x83, 0xec, 0x08, 0xe8, 0x83, 0xfa, 0xff, 0xff, 0x31,
            0xd2, 0x85,
        ];
        assert_eq!(wrapper_target(&code, 0x3ee60), Some(0x3e8f0));
    }

    #[test]
    fn garbage_is_no_elf() {
        assert_eq!(find(b"not an ELF file"), InternalCalls::default());
        assert_eq!(find(&[]), InternalCalls::default());
    }

    /// This machine's OpenSSL (Debian 12's 3.0) is found; skipped where it
    /// is not installed.
    #[test]
    fn the_system_libssl_has_its_internal_calls_found() {
        let path = "/usr/lib/x86_64-linux-gnu/libssl.so.3";
        let Ok(data) = std::fs::read(path) else {
            return;
        };
        let calls = find(&data);
        let (write, read) = (calls.write.expect("write"), calls.read.expect("read"));
        assert_ne!(write.offset, read.offset);
        assert_eq!((write.count_arg, read.count_arg), (3, 3));
    }
}
