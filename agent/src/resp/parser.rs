//! Incremental, structure-only RESP2/RESP3 parser for one direction of a
//! connection.
//!
//! Written here rather than taken from a crate: the RESP crates (e.g.
//! `redis-protocol`, `redis`'s own parser) build values from contiguous
//! buffers; none parses in place from arbitrary splits, keeps nothing but
//! structure, and knows about bytes the capture did not keep.
//!
//! The parser never stores values. Per frame it keeps the first bytes of the
//! few things the matcher needs (command name, subcommand and one more
//! argument; a reply's error prefix or pub/sub kind), all bounded by
//! [`CAPTURE`]. Memory per parser is fixed: a header line buffer of
//! [`MAX_LINE`] bytes, a nesting stack of [`MAX_DEPTH`] levels and a resync
//! candidate buffer of [`MAX_LINE`] bytes.

use super::{Chunk, commands};

/// Deepest nesting followed; deeper is treated as garbage. Redis replies
/// nest a handful of levels (`COMMAND DOCS` about six).
pub(super) const MAX_DEPTH: usize = 32;
/// Longest header line kept (`*<count>`, `$<length>`, `:<integer>`), and the
/// longest resync candidate. Simple strings and errors may be longer: only
/// their first [`CAPTURE`] bytes are kept.
pub(super) const MAX_LINE: usize = 64;
/// Bytes kept of each captured string (longest command name: 26).
pub(super) const CAPTURE: usize = 32;
/// Redis closes a client whose inline command exceeds 64 KiB
/// (`PROTO_INLINE_MAX_SIZE`).
const MAX_INLINE: u64 = 64 * 1024;
/// Redis rejects requests with more arguments than this ("invalid multibulk
/// length").
const MAX_ARGS: i64 = 1024 * 1024;
/// Largest request argument accepted; Redis's `proto-max-bulk-len` defaults
/// to 512 MB and can be raised, so leave headroom.
const MAX_REQUEST_BULK: i64 = 1 << 34;

/// Which stream a parser reads: requests are arrays of bulk strings or inline
/// commands and resynchronise on their own; replies are any RESP3 value and
/// resynchronise only when the matcher says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Request,
    Reply,
}

/// Type byte reported for an inline command (not a RESP type byte).
pub(super) const INLINE: u8 = b'i';

/// The first [`CAPTURE`] bytes of a string value, and whether that is all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Capture {
    buf: [u8; CAPTURE],
    len: u8,
    complete: bool,
}

impl Capture {
    const fn new() -> Self {
        Self {
            buf: [0; CAPTURE],
            len: 0,
            complete: true,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let start = usize::from(self.len);
        let n = bytes.len().min(CAPTURE - start);
        self.buf[start..start + n].copy_from_slice(&bytes[..n]);
        self.len += n as u8; // n ≤ CAPTURE
        if n < bytes.len() {
            self.complete = false;
        }
    }

    /// The bytes kept (a prefix when the value was longer or partly uncaptured).
    pub(super) fn prefix(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    /// The whole value, when it fit and was captured.
    pub(super) fn whole(&self) -> Option<&[u8]> {
        self.complete.then(|| self.prefix())
    }
}

/// One of the first three elements of a top-level aggregate (or words of an
/// inline command).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Elem {
    Absent,
    Str(Capture),
    Int(i64),
    Other,
}

/// What the parser knows about a top-level frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Frame {
    /// Timestamp of the chunk holding the frame's first byte (attributes
    /// included).
    pub first_ts_ns: u64,
    /// Bytes of the frame, uncaptured ones included.
    pub bytes: u64,
    /// Top-level type byte after any attribute, or [`INLINE`]; 0 until known.
    pub ty: u8,
    /// RESP2 `$-1`/`*-1`, RESP3 `_`.
    pub null: bool,
    /// Elements of a top-level aggregate; words of an inline command.
    pub count: u64,
    /// Content of a top-level simple line or blob (`+ - $ ! = , ( #`).
    pub head: Capture,
    pub elems: [Elem; 3],
}

impl Frame {
    const fn new(ts_ns: u64) -> Self {
        Self {
            first_ts_ns: ts_ns,
            bytes: 0,
            ty: 0,
            null: false,
            count: 0,
            head: Capture::new(),
            elems: [Elem::Absent; 3],
        }
    }
}

/// What the parser reports to its owner.
#[derive(Debug)]
pub(super) enum Event<'a> {
    /// A complete top-level frame.
    Frame(&'a Frame),
    /// Sync lost (a header fell into uncaptured bytes, or garbage). `partial`
    /// is the frame under way if its top-level header had been read.
    Desync { partial: Option<&'a Frame> },
}

#[derive(Debug, Clone, Copy)]
enum Target {
    None,
    Head,
    Elem(usize),
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Expecting a type byte (a top-level frame or the next element).
    Header,
    /// Inside the line after type byte `ty`.
    Line { ty: u8 },
    /// Inside an inline command; `in_word` tracks word boundaries.
    Inline { in_word: bool },
    /// Inside a blob of known length.
    Payload { remaining: u64, target: Target },
    /// The CRLF after a blob; `seen` of its two bytes read.
    Crlf { seen: u8 },
    /// Lost; see [`Parser::desync_byte`] and [`Parser::resync`].
    Desync,
}

#[derive(Debug, Clone, Copy)]
struct Level {
    /// Elements still to come.
    remaining: u64,
    /// Elements completed so far.
    index: u64,
    /// A RESP3 attribute: annotates the next value, is not one itself.
    attr: bool,
}

#[derive(Debug)]
pub(super) struct Parser {
    side: Side,
    state: State,
    ts_ns: u64,
    frame: Frame,
    /// A frame's first byte has been read.
    frame_active: bool,
    /// Its top-level header was valid: it is a real (if partial) frame.
    header_ok: bool,
    /// Open aggregates, innermost last (at most [`MAX_DEPTH`]). A `Vec`, not
    /// an array: most frames nest 0–2 deep, and an agent keeps two parsers
    /// per traced connection.
    stack: Vec<Level>,
    line: [u8; MAX_LINE],
    line_len: usize,
    /// The current line is longer than [`MAX_LINE`].
    line_over: bool,
    /// The previous byte was `\r` (lines must end in CRLF).
    line_cr: bool,
    /// Length of the inline command so far.
    inline_len: u64,
    /// The next byte is the first of a chunk (a syscall boundary).
    chunk_start: bool,
    /// Request resync candidate: bytes since a plausible request start.
    cand: [u8; MAX_LINE],
    cand_len: usize,
    cand_ts_ns: u64,
    /// The candidate started a chunk, so it may be an inline command.
    cand_inline_ok: bool,
    replaying: bool,
    unparsed_bytes: u64,
    desyncs: u64,
    /// Tests: without [`Parser::whole_request`], to compare with it.
    #[cfg(test)]
    step_only: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Candidate {
    More,
    Match,
    No,
}

impl Parser {
    /// A parser at the start of a stream.
    pub(super) fn new(side: Side) -> Self {
        Self {
            side,
            state: State::Header,
            ts_ns: 0,
            frame: Frame::new(0),
            frame_active: false,
            header_ok: false,
            stack: Vec::new(),
            line: [0; MAX_LINE],
            line_len: 0,
            line_over: false,
            line_cr: false,
            inline_len: 0,
            chunk_start: true,
            cand: [0; MAX_LINE],
            cand_len: 0,
            cand_ts_ns: 0,
            cand_inline_ok: false,
            replaying: false,
            unparsed_bytes: 0,
            desyncs: 0,
            #[cfg(test)]
            step_only: false,
        }
    }

    /// A parser joining a stream somewhere in the middle: it starts lost.
    pub(super) fn mid_stream(side: Side) -> Self {
        Self {
            state: State::Desync,
            ..Self::new(side)
        }
    }

    pub(super) fn is_desynced(&self) -> bool {
        matches!(self.state, State::Desync)
    }

    /// Bytes skipped while lost.
    pub(super) fn unparsed_bytes(&self) -> u64 {
        self.unparsed_bytes
    }

    /// Times sync was lost.
    pub(super) fn desyncs(&self) -> u64 {
        self.desyncs
    }

    /// Reply side: the next byte fed starts a frame.
    pub(super) fn resync(&mut self) {
        self.state = State::Header;
        self.frame_active = false;
        self.stack.clear();
    }

    pub(super) fn feed(&mut self, chunk: &Chunk<'_>, out: &mut dyn FnMut(Event<'_>)) {
        self.ts_ns = chunk.ts_ns;
        // A syscall boundary is where requests most often start.
        self.chunk_start = true;
        self.consume(chunk.data, out);
        let gap = chunk.gap();
        if gap > 0 {
            self.skip(gap, out);
        }
    }

    fn consume(&mut self, mut data: &[u8], out: &mut dyn FnMut(Event<'_>)) {
        while let Some(&b) = data.first() {
            if let State::Payload { remaining, target } = self.state {
                let n = usize::try_from(remaining).map_or(data.len(), |r| r.min(data.len()));
                self.capture(target, &data[..n]);
                self.frame.bytes += n as u64;
                self.chunk_start = false;
                let remaining = remaining - n as u64;
                self.state = if remaining == 0 {
                    State::Crlf { seen: 0 }
                } else {
                    State::Payload { remaining, target }
                };
                data = &data[n..];
            } else if let Some(n) = self.whole_request(data, out) {
                data = &data[n..];
            } else if let Some(n) = self.whole_line(data, out) {
                data = &data[n..];
            } else {
                self.step(b, out);
                data = &data[1..];
            }
        }
    }

    /// A header line (`$3\r\n`) or a value's closing CRLF wholly in `data`,
    /// taken at once: exactly what stepping through its bytes does, without
    /// a step per byte (the parser's main cost). The bytes consumed, or
    /// `None` to step.
    fn whole_line(&mut self, data: &[u8], out: &mut dyn FnMut(Event<'_>)) -> Option<usize> {
        match self.state {
            State::Crlf { seen: 0 } if crlf_at(data, 0) => {
                self.frame.bytes += 2;
                self.chunk_start = false;
                self.state = State::Header;
                self.value_done(out);
                Some(2)
            }
            State::Header => {
                let window = &data[1..data.len().min(MAX_LINE + 3)];
                let end = window.iter().position(|&b| b == b'\r' || b == b'\n')?;
                if !crlf_at(window, end) || end > MAX_LINE {
                    return None;
                }
                self.step(data[0], out);
                let State::Line { ty } = self.state else {
                    // An inline command or a desync: stepped from here on.
                    return Some(1);
                };
                self.line[..end].copy_from_slice(&window[..end]);
                self.line_len = end;
                self.frame.bytes += end as u64 + 2;
                self.line_done(ty, out);
                Some(end + 3)
            }
            _ => None,
        }
    }

    /// A whole request (`*<n>\r\n` and its `n` bulk strings) at the start
    /// of `data`, taken in one pass: exactly the frame stepping through it
    /// gives, without the per-element states (with `-P 16` request parsing
    /// was a third of the agent's CPU). The bytes consumed, or `None` to
    /// step: a request that goes on past `data`, or anything unusual (signs,
    /// empty arrays, inline commands, malformed input) is left to the steps.
    fn whole_request(&mut self, data: &[u8], out: &mut dyn FnMut(Event<'_>)) -> Option<usize> {
        if self.side != Side::Request
            || self.frame_active
            || !matches!(self.state, State::Header)
            || data.first() != Some(&b'*')
        {
            return None;
        }
        #[cfg(test)]
        if self.step_only {
            return None;
        }
        let mut at = 1;
        let count = whole_number(data, &mut at).filter(|&n| (1..=MAX_ARGS as u64).contains(&n))?;
        let mut elems = [Elem::Absent; 3];
        for i in 0..count {
            if data.get(at) != Some(&b'$') {
                return None;
            }
            at += 1;
            let len = whole_number(data, &mut at).filter(|&n| n <= MAX_REQUEST_BULK as u64)?;
            let end = at.checked_add(usize::try_from(len).ok()?)?;
            let value = data.get(at..end)?;
            if !crlf_at(data, end) {
                return None;
            }
            if let Some(elem) = elems.get_mut(i as usize) {
                let mut capture = Capture::new();
                capture.push(value);
                *elem = Elem::Str(capture);
            }
            at = end + 2;
        }
        self.frame = Frame {
            bytes: at as u64,
            ty: b'*',
            count,
            elems,
            ..Frame::new(self.ts_ns)
        };
        self.header_ok = true;
        self.chunk_start = false;
        self.finish_frame(out);
        Some(at)
    }

    /// `gap` bytes were sent but not captured.
    fn skip(&mut self, mut gap: u64, out: &mut dyn FnMut(Event<'_>)) {
        while gap > 0 {
            match self.state {
                State::Payload { remaining, target } => {
                    let n = remaining.min(gap);
                    self.lose(target);
                    self.frame.bytes += n;
                    gap -= n;
                    self.state = if n == remaining {
                        State::Crlf { seen: 0 }
                    } else {
                        State::Payload {
                            remaining: remaining - n,
                            target,
                        }
                    };
                }
                State::Crlf { seen } => {
                    let n = u64::from(2 - seen).min(gap);
                    self.frame.bytes += n;
                    gap -= n;
                    if u64::from(seen) + n == 2 {
                        self.state = State::Header;
                        self.value_done(out);
                    } else {
                        self.state = State::Crlf { seen: seen + 1 };
                    }
                }
                State::Desync => {
                    // A candidate cannot span uncaptured bytes.
                    self.unparsed_bytes += self.cand_len as u64 + gap;
                    self.cand_len = 0;
                    gap = 0;
                }
                // A header (or the start of the next frame) was not captured.
                State::Header | State::Line { .. } | State::Inline { .. } => self.desync(out),
            }
        }
    }

    fn step(&mut self, b: u8, out: &mut dyn FnMut(Event<'_>)) {
        match self.state {
            State::Desync => {
                self.desync_byte(b, out);
                return;
            }
            State::Header => self.header_byte(b, out),
            State::Line { ty } => self.line_byte(ty, b, out),
            State::Inline { in_word } => self.inline_byte(in_word, b, out),
            State::Crlf { seen } => {
                let want = if seen == 0 { b'\r' } else { b'\n' };
                if b != want {
                    return self.malformed(b, out);
                }
                self.frame.bytes += 1;
                if seen == 0 {
                    self.state = State::Crlf { seen: 1 };
                } else {
                    self.state = State::Header;
                    self.value_done(out);
                }
            }
            State::Payload { .. } => unreachable!("payloads are consumed in bulk"),
        }
        self.chunk_start = false;
    }

    fn header_byte(&mut self, b: u8, out: &mut dyn FnMut(Event<'_>)) {
        let top = self.stack.is_empty();
        let valid = match self.side {
            // Requests: arrays of bulk strings, or an inline command.
            Side::Request => (top && !self.frame_active) || b == b'$',
            Side::Reply => matches!(
                b,
                b'+' | b'-'
                    | b':'
                    | b'$'
                    | b'*'
                    | b'_'
                    | b','
                    | b'#'
                    | b'('
                    | b'='
                    | b'!'
                    | b'%'
                    | b'~'
                    | b'>'
                    | b'|'
            ),
        };
        if !valid {
            return self.malformed(b, out);
        }
        if !self.frame_active {
            self.frame = Frame::new(self.ts_ns);
            self.frame_active = true;
            self.header_ok = false;
        }
        self.line_len = 0;
        self.line_over = false;
        self.line_cr = false;
        if self.side == Side::Request && top && b != b'*' {
            self.inline_len = 0;
            self.state = State::Inline { in_word: false };
            self.inline_byte(false, b, out);
        } else {
            self.frame.bytes += 1;
            self.state = State::Line { ty: b };
        }
    }

    fn line_byte(&mut self, ty: u8, b: u8, out: &mut dyn FnMut(Event<'_>)) {
        self.frame.bytes += 1;
        match b {
            b'\n' if self.line_cr => self.line_done(ty, out),
            b'\r' if !self.line_cr => self.line_cr = true,
            b'\r' | b'\n' => self.malformed(b, out),
            _ if self.line_cr => self.malformed(b, out),
            _ => {
                if self.line_len < MAX_LINE {
                    self.line[self.line_len] = b;
                    self.line_len += 1;
                } else {
                    self.line_over = true;
                }
            }
        }
    }

    fn line_done(&mut self, ty: u8, out: &mut dyn FnMut(Event<'_>)) {
        let target = self.target();
        let top = self.stack.is_empty();
        let is_number = matches!(
            ty,
            b':' | b'$' | b'=' | b'!' | b'*' | b'%' | b'~' | b'>' | b'|'
        );
        let number = if is_number {
            match (!self.line_over)
                .then(|| parse_i64(&self.line[..self.line_len]))
                .flatten()
            {
                Some(n) => n,
                None => return self.malformed_consumed(out),
            }
        } else {
            0
        };
        self.state = State::Header;
        match ty {
            b'$' | b'=' | b'!' => {
                let too_big = self.side == Side::Request && number > MAX_REQUEST_BULK;
                if number < -1 || too_big || (self.side == Side::Request && number < 0) {
                    return self.malformed_consumed(out);
                }
                self.header_read(ty);
                if number == -1 {
                    self.set_elem(target, Elem::Other);
                    self.frame.null |= top;
                    return self.value_done(out);
                }
                if let Target::Elem(i) = target {
                    self.frame.elems[i] = Elem::Str(Capture::new());
                }
                self.state = State::Payload {
                    remaining: number as u64, // ≥ 0
                    target,
                };
            }
            b'*' | b'%' | b'~' | b'>' | b'|' => {
                let count = if matches!(ty, b'%' | b'|') {
                    number.checked_mul(2)
                } else {
                    Some(number)
                };
                let Some(count) = count.filter(|&c| c >= -1) else {
                    return self.malformed_consumed(out);
                };
                if self.side == Side::Request && count > MAX_ARGS {
                    return self.malformed_consumed(out);
                }
                if count > 0 && self.stack.len() == MAX_DEPTH {
                    return self.malformed_consumed(out);
                }
                self.header_read(ty);
                if top {
                    self.frame.count = count.max(0) as u64;
                }
                if count <= 0 {
                    if self.side == Side::Request {
                        // Redis ignores `*0` and `*-1` requests: no reply.
                        self.frame_active = false;
                        return;
                    }
                    if ty == b'|' {
                        return; // empty attribute: the value follows
                    }
                    self.set_elem(target, Elem::Other);
                    self.frame.null |= top && count < 0;
                    return self.value_done(out);
                }
                self.set_elem(target, Elem::Other);
                self.stack.push(Level {
                    remaining: count as u64, // > 0
                    index: 0,
                    attr: ty == b'|',
                });
            }
            b':' => {
                self.header_read(ty);
                self.set_elem(target, Elem::Int(number));
                self.value_done(out);
            }
            _ => {
                // `+ - , ( # _`: a simple line.
                self.header_read(ty);
                let mut capture = Capture::new();
                capture.push(&self.line[..self.line_len]);
                if self.line_over {
                    capture.complete = false;
                }
                match target {
                    Target::Head => self.frame.head = capture,
                    Target::Elem(i) => self.frame.elems[i] = Elem::Str(capture),
                    Target::None => {}
                }
                self.frame.null |= top && ty == b'_';
                self.value_done(out);
            }
        }
    }

    /// A valid header: at the top level (attributes aside) it makes the
    /// frame real.
    fn header_read(&mut self, ty: u8) {
        if self.stack.is_empty() && ty != b'|' {
            self.frame.ty = ty;
            self.header_ok = true;
        }
    }

    fn inline_byte(&mut self, in_word: bool, b: u8, out: &mut dyn FnMut(Event<'_>)) {
        self.frame.bytes += 1;
        self.inline_len += 1;
        if self.inline_len > MAX_INLINE {
            return self.malformed_consumed(out);
        }
        let word = self.frame.count as usize; // words so far
        match b {
            b'\n' => {
                if in_word && !self.inline_word_done(out) {
                    return;
                }
                if self.frame.count == 0 {
                    // Redis skips empty lines: no command, no reply.
                    self.frame_active = false;
                    self.state = State::Header;
                    return;
                }
                self.state = State::Header;
                self.finish_frame(out);
            }
            b' ' | b'\t' | b'\r' => {
                if in_word && !self.inline_word_done(out) {
                    return;
                }
                self.state = State::Inline { in_word: false };
            }
            // The first word must look like a command name: reject garbage
            // at its first bad byte, which may itself start a request.
            _ if (self.frame.count == 0 || (self.frame.count == 1 && in_word))
                && (!is_name_byte(b) || self.first_word_full()) =>
            {
                self.malformed(b, out);
            }
            _ => {
                if !in_word {
                    self.frame.count += 1;
                    if word < 3 {
                        self.frame.elems[word] = Elem::Str(Capture::new());
                    }
                }
                let current = self.frame.count as usize - 1;
                if let Some(Elem::Str(capture)) = self.frame.elems.get_mut(current) {
                    capture.push(&[b]);
                }
                self.state = State::Inline { in_word: true };
            }
        }
    }

    fn first_word_full(&self) -> bool {
        matches!(self.frame.elems[0], Elem::Str(c) if c.prefix().len() == CAPTURE)
    }

    /// A word of an inline command ended; the first must name a known
    /// command (Redis would answer anything else with an error, but a capture
    /// that lost its place is far likelier than a client typing garbage).
    fn inline_word_done(&mut self, out: &mut dyn FnMut(Event<'_>)) -> bool {
        if self.frame.count != 1 {
            return true;
        }
        let known = match self.frame.elems[0] {
            Elem::Str(c) => c.whole().and_then(|w| commands::lookup(w, None)).is_some(),
            _ => false,
        };
        if known {
            self.frame.ty = INLINE;
            self.header_ok = true;
        } else {
            self.malformed_consumed(out);
        }
        known
    }

    /// Where the value starting now is captured.
    fn target(&self) -> Target {
        match self.stack.len() {
            0 => Target::Head,
            1 if !self.stack[0].attr && self.stack[0].index < 3 => {
                Target::Elem(self.stack[0].index as usize)
            }
            _ => Target::None,
        }
    }

    fn set_elem(&mut self, target: Target, elem: Elem) {
        if let Target::Elem(i) = target {
            self.frame.elems[i] = elem;
        }
    }

    fn capture(&mut self, target: Target, bytes: &[u8]) {
        match target {
            Target::Head => self.frame.head.push(bytes),
            Target::Elem(i) => {
                if let Elem::Str(c) = &mut self.frame.elems[i] {
                    c.push(bytes);
                }
            }
            Target::None => {}
        }
    }

    fn lose(&mut self, target: Target) {
        match target {
            Target::Head => self.frame.head.complete = false,
            Target::Elem(i) => {
                if let Elem::Str(c) = &mut self.frame.elems[i] {
                    c.complete = false;
                }
            }
            Target::None => {}
        }
    }

    /// A value ended: count it in its parent, closing finished aggregates.
    fn value_done(&mut self, out: &mut dyn FnMut(Event<'_>)) {
        loop {
            let Some(level) = self.stack.last_mut() else {
                return self.finish_frame(out);
            };
            level.remaining -= 1;
            level.index += 1;
            if level.remaining > 0 {
                return;
            }
            let attr = level.attr;
            self.stack.pop();
            if attr {
                // The annotated value comes next, in the same position.
                return;
            }
        }
    }

    fn finish_frame(&mut self, out: &mut dyn FnMut(Event<'_>)) {
        self.frame_active = false;
        self.state = State::Header;
        out(Event::Frame(&self.frame));
    }

    /// Byte `b` does not fit: lose sync, then look at `b` again as a possible
    /// resync point.
    fn malformed(&mut self, b: u8, out: &mut dyn FnMut(Event<'_>)) {
        if matches!(self.state, State::Line { .. } | State::Inline { .. }) {
            // Counted as part of the frame by line_byte/inline_byte.
            self.frame.bytes -= 1;
            self.inline_len = self.inline_len.saturating_sub(1);
        }
        self.desync(out);
        self.desync_byte(b, out);
    }

    /// The bytes read so far do not fit (the last one included).
    fn malformed_consumed(&mut self, out: &mut dyn FnMut(Event<'_>)) {
        self.desync(out);
    }

    fn desync(&mut self, out: &mut dyn FnMut(Event<'_>)) {
        let partial = self.frame_active && self.header_ok;
        if self.frame_active && !self.header_ok {
            // Never a frame: its bytes were garbage.
            self.unparsed_bytes += self.frame.bytes;
        }
        out(Event::Desync {
            partial: partial.then_some(&self.frame),
        });
        self.frame_active = false;
        self.header_ok = false;
        self.stack.clear();
        self.cand_len = 0;
        self.state = State::Desync;
        self.desyncs += 1;
    }

    /// Lost: replies wait for [`Parser::resync`]; requests look for the next
    /// plausible request start (see [`candidate`]).
    fn desync_byte(&mut self, b: u8, out: &mut dyn FnMut(Event<'_>)) {
        let chunk_start = self.chunk_start;
        self.chunk_start = false;
        if self.side == Side::Reply || self.replaying {
            self.unparsed_bytes += 1;
            return;
        }
        if self.cand_len == 0 {
            let inline_ok = chunk_start && b.is_ascii_alphabetic();
            if b != b'*' && !inline_ok {
                self.unparsed_bytes += 1;
                return;
            }
            self.cand_inline_ok = inline_ok;
            self.cand_ts_ns = self.ts_ns;
        }
        self.cand[self.cand_len] = b;
        self.cand_len += 1;
        loop {
            let verdict = if self.cand_len == MAX_LINE {
                Candidate::No
            } else {
                candidate(&self.cand[..self.cand_len], self.cand_inline_ok)
            };
            match verdict {
                Candidate::More => return,
                Candidate::Match => return self.replay(out),
                Candidate::No => {
                    // A real start may hide inside the failed candidate.
                    let buf = &self.cand[..self.cand_len];
                    let next = (1..buf.len())
                        .find(|&i| buf[i] == b'*')
                        .unwrap_or(buf.len());
                    self.cand_inline_ok = false;
                    self.cand.copy_within(next..self.cand_len, 0);
                    self.cand_len -= next;
                    self.unparsed_bytes += next as u64;
                    if self.cand_len == 0 {
                        return;
                    }
                }
            }
        }
    }

    /// The candidate is a request start: parse it for real.
    fn replay(&mut self, out: &mut dyn FnMut(Event<'_>)) {
        let (buf, len) = (self.cand, self.cand_len);
        self.cand_len = 0;
        self.state = State::Header;
        self.frame_active = false;
        self.stack.clear();
        let ts = self.ts_ns;
        self.ts_ns = self.cand_ts_ns;
        self.replaying = true;
        self.consume(&buf[..len], out);
        self.replaying = false;
        self.ts_ns = ts;
    }
}

/// Is `buf` the start of a request? `*<1..=7 digits>\r\n$<1..=2 digits>\r\n`
/// followed by a known command name and CRLF, or — at the start of a chunk —
/// a known command name followed by a space or line end (an inline command).
/// Inline starts are only looked for at syscall boundaries: after any newline
/// they would match bulk contents such as `$3\r\nGET\r\n`.
fn candidate(buf: &[u8], inline_ok: bool) -> Candidate {
    if buf.first() == Some(&b'*') {
        return multibulk_candidate(buf);
    }
    if !inline_ok {
        return Candidate::No;
    }
    match buf.iter().position(|&b| matches!(b, b' ' | b'\r' | b'\n')) {
        Some(end) if commands::lookup(&buf[..end], None).is_some() => Candidate::Match,
        Some(_) => Candidate::No,
        None if buf.len() <= CAPTURE && buf.iter().all(|&b| is_name_byte(b)) => Candidate::More,
        None => Candidate::No,
    }
}

fn multibulk_candidate(buf: &[u8]) -> Candidate {
    struct Cursor<'a> {
        buf: &'a [u8],
        at: usize,
    }
    impl Cursor<'_> {
        fn expect(&mut self, bytes: &[u8]) -> Result<(), Candidate> {
            for &want in bytes {
                match self.buf.get(self.at) {
                    None => return Err(Candidate::More),
                    Some(&b) if b == want => self.at += 1,
                    Some(_) => return Err(Candidate::No),
                }
            }
            Ok(())
        }
        /// 1..=max digits, then CRLF; the value must be in 1..=limit.
        fn number(&mut self, max: usize, limit: u64) -> Result<u64, Candidate> {
            let start = self.at;
            let mut n: u64 = 0;
            while let Some(&b) = self.buf.get(self.at) {
                if !b.is_ascii_digit() {
                    break;
                }
                n = n * 10 + u64::from(b - b'0');
                self.at += 1;
                if self.at - start > max {
                    return Err(Candidate::No);
                }
            }
            if self.at == self.buf.len() {
                return Err(Candidate::More);
            }
            if self.at == start || n == 0 || n > limit {
                return Err(Candidate::No);
            }
            self.expect(b"\r\n")?;
            Ok(n)
        }
    }
    let mut c = Cursor { buf, at: 0 };
    let result = (|| {
        c.expect(b"*")?;
        c.number(7, MAX_ARGS as u64)?;
        c.expect(b"$")?;
        let len = c.number(2, CAPTURE as u64)? as usize;
        let name = &buf[c.at..buf.len().min(c.at + len)];
        if !name.iter().all(|&b| is_name_byte(b)) {
            return Err(Candidate::No);
        }
        if name.len() < len {
            return Err(Candidate::More);
        }
        c.at += len;
        c.expect(b"\r\n")?;
        match commands::lookup(name, None) {
            Some(_) => Ok(()),
            None => Err(Candidate::No),
        }
    })();
    match result {
        Ok(()) => Candidate::Match,
        Err(verdict) => verdict,
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'|')
}

/// `\r\n` at `at` in `data`. Two byte compares: a slice compare would
/// call `memcmp` (5% of the agent's CPU with `-P 16`).
#[inline]
fn crlf_at(data: &[u8], at: usize) -> bool {
    data.get(at) == Some(&b'\r') && data.get(at + 1) == Some(&b'\n')
}

/// Digits (1 to 18: no overflow, within [`MAX_LINE`]) and CRLF at `*at`,
/// which moves past them; `None` for anything else, a sign included.
fn whole_number(data: &[u8], at: &mut usize) -> Option<u64> {
    let digits = data.get(*at..)?;
    let len = digits.iter().take(19).position(|b| !b.is_ascii_digit())?;
    if len == 0 || len > 18 || !crlf_at(digits, len) {
        return None;
    }
    let n = digits[..len]
        .iter()
        .fold(0, |n, &b| n * 10 + u64::from(b - b'0'));
    *at += len + 2;
    Some(n)
}

/// A RESP integer: optional `-`, then digits, fitting an i64.
fn parse_i64(line: &[u8]) -> Option<i64> {
    let (negative, digits) = match line.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, line),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: i64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(i64::from(b - b'0'))?;
    }
    Some(if negative { -n } else { n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum Seen {
        Frame(Frame),
        Desync(Option<Frame>),
    }

    fn run(parser: &mut Parser, chunks: &[Chunk<'_>]) -> Vec<Seen> {
        let mut seen = Vec::new();
        for chunk in chunks {
            parser.feed(chunk, &mut |event| {
                seen.push(match event {
                    Event::Frame(frame) => Seen::Frame(frame.clone()),
                    Event::Desync { partial } => Seen::Desync(partial.cloned()),
                });
            });
        }
        seen
    }

    fn frames(side: Side, stream: &[u8]) -> Vec<Frame> {
        run(&mut Parser::new(side), &[Chunk::new(1, stream)])
            .into_iter()
            .map(|seen| match seen {
                Seen::Frame(frame) => frame,
                Seen::Desync(_) => panic!("lost sync in {:?}", String::from_utf8_lossy(stream)),
            })
            .collect()
    }

    fn one_byte_at_a_time(side: Side, stream: &[u8]) -> Vec<Seen> {
        let chunks: Vec<_> = stream.chunks(1).map(|b| Chunk::new(1, b)).collect();
        run(&mut Parser::new(side), &chunks)
    }

    fn str_elem(frame: &Frame, i: usize) -> &[u8] {
        match &frame.elems[i] {
            Elem::Str(c) => c.whole().expect("captured whole"),
            other => panic!("element {i} is {other:?}"),
        }
    }

    /// Every RESP2/RESP3 reply type, as Redis 7 writes them.
    const ALL_TYPES: &[u8] = b"+OK\r\n\
        -WRONGTYPE Operation against a key holding the wrong kind of value\r\n\
        :1000\r\n\
        $5\r\nhello\r\n\
        $-1\r\n\
        *-1\r\n\
        *2\r\n$1\r\na\r\n:2\r\n\
        _\r\n\
        ,3.14\r\n\
        #t\r\n\
        (3492890328409238509324850943850943825024385\r\n\
        =15\r\ntxt:Some string\r\n\
        !21\r\nSYNTAX invalid syntax\r\n\
        %2\r\n+first\r\n:1\r\n+second\r\n:2\r\n\
        ~2\r\n+a\r\n+b\r\n\
        >3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n\
        |1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n*0\r\n";

    #[test]
    fn parses_every_reply_type() {
        let frames = frames(Side::Reply, ALL_TYPES);
        let types: Vec<u8> = frames.iter().map(|f| f.ty).collect();
        assert_eq!(types, b"+-:$$**_,#(=!%~>*");
        let nulls: Vec<bool> = frames.iter().map(|f| f.null).collect();
        let expected_nulls = [4, 5, 7];
        for (i, null) in nulls.iter().enumerate() {
            assert_eq!(*null, expected_nulls.contains(&i), "frame {i}");
        }
        assert_eq!(frames[1].head.prefix(), b"WRONGTYPE Operation against a ke");
        assert_eq!(frames[3].head.whole(), Some(&b"hello"[..]));
        assert_eq!(frames[12].head.whole(), Some(&b"SYNTAX invalid syntax"[..]));
        assert_eq!(str_elem(&frames[15], 0), b"message");
        assert_eq!(frames[15].count, 3);
        assert_eq!(frames[13].count, 4);
        // The attribute is not a frame of its own: it belongs to the `*0` after it.
        assert_eq!(frames[16].count, 0);
        assert_eq!(frames[16].first_ts_ns, 1);
        let total: u64 = frames.iter().map(|f| f.bytes).sum();
        assert_eq!(total, ALL_TYPES.len() as u64);
    }

    #[test]
    fn any_split_parses_the_same() {
        let whole = run(&mut Parser::new(Side::Reply), &[Chunk::new(1, ALL_TYPES)]);
        assert_eq!(one_byte_at_a_time(Side::Reply, ALL_TYPES), whole);
        let requests = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\nPING\r\n*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n";
        let whole = run(&mut Parser::new(Side::Request), &[Chunk::new(1, requests)]);
        assert_eq!(whole.len(), 3);
        assert_eq!(one_byte_at_a_time(Side::Request, requests), whole);
    }

    /// Request-stream pieces around the one-pass path's edges: whole
    /// arrays, arguments longer than a capture, empty ones, numbers with
    /// leading zeros, signs or too many digits, empty arrays, inline
    /// commands and truncation.
    fn request_piece() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::{collection::vec, prelude::*};
        let arg = prop_oneof![
            vec(any::<u8>(), 0..4),
            vec(
                prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'*'), Just(b'a')],
                30..40
            ),
        ];
        let array = (vec(arg, 1..6), 0usize..4, any::<u8>()).prop_map(|(args, zeros, cut)| {
            let mut bytes = format!("*{}{}\r\n", "0".repeat(zeros), args.len()).into_bytes();
            for arg in &args {
                bytes.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
                bytes.extend_from_slice(arg);
                bytes.extend_from_slice(b"\r\n");
            }
            if cut % 4 == 0 {
                // A request cut short, and its end sent as another request.
                bytes.truncate(usize::from(cut) % bytes.len());
            }
            bytes
        });
        prop_oneof![
            4 => array,
            1 => Just(b"*0\r\n*-1\r\n".to_vec()),
            1 => Just(b"*+1\r\n$4\r\nPING\r\n".to_vec()),
            1 => Just(b"*1\r\n$-1\r\n".to_vec()),
            1 => Just(b"*1\r\n$0000000000000000004\r\nPING\r\n".to_vec()),
            1 => Just(b"*1\r\n$4\r\nPINGxx".to_vec()),
            1 => Just(b"PING\r\n".to_vec()),
            1 => vec(any::<u8>(), 1..8),
        ]
    }

    proptest::proptest! {
        #[test]
        fn requests_parse_alike_in_one_pass_and_stepped(
            pieces in proptest::collection::vec(request_piece(), 1..8)
        ) {
            let stream = pieces.concat();
            let chunks = [Chunk::new(1, &stream)];
            let one_pass = run(&mut Parser::new(Side::Request), &chunks);
            let stepped = run(&mut Parser { step_only: true, ..Parser::new(Side::Request) }, &chunks);
            proptest::prop_assert_eq!(one_pass, stepped);
        }
    }

    #[test]
    fn requests_keep_name_and_first_arguments_only() {
        let value = vec![b'v'; 100];
        let mut stream = b"*4\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$3\r\nOFF\r\n$100\r\n".to_vec();
        stream.extend_from_slice(&value);
        stream.extend_from_slice(b"\r\n");
        let frames = frames(Side::Request, &stream);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].ty, b'*');
        assert_eq!(frames[0].count, 4);
        assert_eq!(str_elem(&frames[0], 0), b"CLIENT");
        assert_eq!(str_elem(&frames[0], 2), b"OFF");
        assert_eq!(frames[0].bytes, stream.len() as u64);
    }

    #[test]
    fn inline_commands_as_telnet_and_health_checks_send_them() {
        let frames = frames(Side::Request, b"PING\r\n\r\nset  k v\nsubscribe a b\r\n");
        assert_eq!(frames.len(), 3, "the empty line is no command");
        assert!(frames.iter().all(|f| f.ty == INLINE));
        assert_eq!(str_elem(&frames[1], 0), b"set");
        assert_eq!(frames[1].count, 3);
        assert_eq!(frames[2].count, 3);
        assert_eq!(str_elem(&frames[2], 2), b"b");
    }

    #[test]
    fn empty_multibulk_requests_are_ignored_like_redis_does() {
        assert_eq!(
            frames(Side::Request, b"*0\r\n*-1\r\n*1\r\n$4\r\nPING\r\n").len(),
            1
        );
    }

    #[test]
    fn skips_uncaptured_payload_of_known_length() {
        // A 100-byte value of which the capture kept 10 bytes, then more.
        let mut parser = Parser::new(Side::Reply);
        let head = b"$100\r\n0123456789";
        let seen = run(
            &mut parser,
            &[
                Chunk::truncated(1, head, (head.len() + 100 - 10 + 2) as u64),
                Chunk::new(2, b"+OK\r\n"),
            ],
        );
        assert_eq!(seen.len(), 2, "{seen:?}");
        let Seen::Frame(bulk) = &seen[0] else {
            panic!("{seen:?}")
        };
        assert_eq!(bulk.bytes, 6 + 100 + 2);
        assert_eq!(bulk.head.prefix(), b"0123456789");
        assert_eq!(bulk.head.whole(), None, "partly uncaptured");
        assert!(matches!(&seen[1], Seen::Frame(f) if f.ty == b'+' && f.first_ts_ns == 2));
        assert_eq!(parser.unparsed_bytes(), 0);
    }

    #[test]
    fn a_header_in_a_gap_loses_sync_and_reports_the_frame_under_way() {
        // LRANGE of two big items: the second item's header was not captured.
        let head = b"*2\r\n$5000\r\nxxxx";
        let mut parser = Parser::new(Side::Reply);
        // `*2\r\n` and two items of `$5000\r\n` + 5000 + CRLF.
        let seen = run(&mut parser, &[Chunk::truncated(1, head, 4 + 2 * 5009)]);
        assert_eq!(seen.len(), 1);
        let Seen::Desync(Some(partial)) = &seen[0] else {
            panic!("{seen:?}")
        };
        assert_eq!(partial.ty, b'*');
        assert!(parser.is_desynced());
        assert_eq!(parser.desyncs(), 1);
        // Replies wait to be told where a frame starts.
        assert!(run(&mut parser, &[Chunk::new(2, b"+OK\r\n")]).is_empty());
        assert_eq!(parser.unparsed_bytes(), 5009 + 5);
        parser.resync();
        assert_eq!(run(&mut parser, &[Chunk::new(3, b"+OK\r\n")]).len(), 1);
    }

    #[test]
    fn requests_resync_at_the_next_request_start() {
        let mut parser = Parser::new(Side::Request);
        // GET with its header uncaptured, then garbage with a false start,
        // then a real request in the same chunk.
        let seen = run(
            &mut parser,
            &[
                Chunk::truncated(1, b"*2\r\n$3\r\nGET\r\n", 30),
                Chunk::new(2, b"\x01\x02*9z\r\n*2\r\n$3\r\nget\r\n$1\r\nk\r\n"),
            ],
        );
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(matches!(&seen[0], Seen::Desync(Some(f)) if str_elem(f, 0) == b"GET"));
        let Seen::Frame(get) = &seen[1] else {
            panic!("{seen:?}")
        };
        assert_eq!(str_elem(get, 0), b"get");
        assert_eq!(get.first_ts_ns, 2);
        assert_eq!(get.bytes, 20);
        assert_eq!(parser.unparsed_bytes(), (30 - 13) + 7);
    }

    #[test]
    fn requests_resync_on_an_inline_command_at_a_chunk_start() {
        let mut parser = Parser::mid_stream(Side::Request);
        let seen = run(
            &mut parser,
            &[
                Chunk::new(1, b"lue\r\n$3\r\nGET\r\n"),
                Chunk::new(2, b"GETX\r\n"),
                Chunk::new(3, b"not a command\r\n"),
                Chunk::new(4, b"PING\r\n"),
            ],
        );
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(
            matches!(&seen[0], Seen::Frame(f) if str_elem(f, 0) == b"PING" && f.first_ts_ns == 4)
        );
        assert_eq!(parser.unparsed_bytes(), 14 + 6 + 15);
    }

    #[test]
    fn a_request_start_split_across_chunks_is_found() {
        let mut parser = Parser::mid_stream(Side::Request);
        let seen = run(
            &mut parser,
            &[
                Chunk::new(1, b"tail of a value *1\r\n$4\r"),
                Chunk::new(2, b"\nPING\r\n"),
            ],
        );
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(matches!(&seen[0], Seen::Frame(f) if f.first_ts_ns == 1));
    }

    #[test]
    fn unknown_inline_words_are_garbage() {
        let mut parser = Parser::new(Side::Request);
        let seen = run(&mut parser, &[Chunk::new(1, b"\x16\x03\x01 TLS hello")]);
        assert_eq!(seen, vec![Seen::Desync(None)]);
        assert_eq!(parser.unparsed_bytes(), 13);
    }

    #[test]
    fn huge_counts_neither_allocate_nor_panic() {
        // A reply may announce a huge array; the parser only counts.
        let mut parser = Parser::new(Side::Reply);
        let seen = run(
            &mut parser,
            &[Chunk::new(
                1,
                b"*100000000\r\n:1\r\n$9223372036854775807\r\nab",
            )],
        );
        assert!(seen.is_empty());
        // A request may not (Redis closes the connection).
        let mut parser = Parser::new(Side::Request);
        let seen = run(
            &mut parser,
            &[Chunk::new(1, b"*100000000\r\n$3\r\nGET\r\n")],
        );
        assert_eq!(seen, vec![Seen::Desync(None)]);
        // Nor overflow.
        let seen = run(
            &mut Parser::new(Side::Reply),
            &[Chunk::new(
                1,
                b"%9223372036854775807\r\n$99999999999999999999\r\n",
            )],
        );
        assert_eq!(seen.len(), 1);
    }

    #[test]
    fn nesting_deeper_than_the_cap_is_garbage() {
        let mut deep = b"*1\r\n".repeat(MAX_DEPTH + 1);
        deep.extend_from_slice(b"+x\r\n");
        let seen = run(&mut Parser::new(Side::Reply), &[Chunk::new(1, &deep)]);
        assert!(matches!(&seen[..], [Seen::Desync(Some(_))]), "{seen:?}");
        let mut ok = b"*1\r\n".repeat(MAX_DEPTH);
        ok.extend_from_slice(b"+x\r\n");
        assert_eq!(frames(Side::Reply, &ok).len(), 1);
    }

    #[test]
    fn long_headers_and_bad_terminators_are_garbage() {
        let long = format!("*{}\r\n", "1".repeat(MAX_LINE + 1));
        let seen = run(
            &mut Parser::new(Side::Reply),
            &[Chunk::new(1, long.as_bytes())],
        );
        assert_eq!(seen, vec![Seen::Desync(None)]);
        let seen = run(&mut Parser::new(Side::Reply), &[Chunk::new(1, b"+OK\n")]);
        assert_eq!(seen, vec![Seen::Desync(None)]);
        let seen = run(
            &mut Parser::new(Side::Reply),
            &[Chunk::new(1, b"$2\r\nabXY")],
        );
        assert_eq!(
            seen,
            vec![Seen::Desync(Some(
                frames(Side::Reply, b"$2\r\nab\r\n")[0].clone()
            ))]
            .into_iter()
            .map(|s| match s {
                Seen::Desync(Some(mut f)) => {
                    f.bytes = 6;
                    f.head.complete = true;
                    Seen::Desync(Some(f))
                }
                s => s,
            })
            .collect::<Vec<_>>()
        );
    }

    #[test]
    fn long_simple_lines_keep_a_prefix() {
        let line = format!("-ERR {}\r\n", "x".repeat(500));
        let frames = frames(Side::Reply, line.as_bytes());
        assert_eq!(frames[0].head.prefix(), &line.as_bytes()[1..1 + CAPTURE]);
        assert_eq!(frames[0].head.whole(), None);
        assert_eq!(frames[0].bytes, line.len() as u64);
    }
}
