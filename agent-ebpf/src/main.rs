//! resptrace kernel programs. Every program is fail-open: tracepoints only
//! observe, and any error inside a program means "record nothing".
#![no_std]
#![no_main]

mod connect;
mod connection;
mod floor;
mod maps;
mod resp;
mod tls;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path to it.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
