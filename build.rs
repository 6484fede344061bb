//! Link settings of the daemon's binary.
//!
//! Packed relative relocations (`DT_RELR`, glibc 2.36 and GNU ld 2.38 or
//! later): a position-independent executable carries one relocation per
//! pointer in its read-only data (vtables, string tables), which the loader
//! reads in full at every start. As `RELA` entries that table is 24 bytes a
//! pointer (1.3 MB in this binary, all of it resident for the process's
//! life); packed, it is a few kilobytes. The executable stays
//! position-independent (ASLR unchanged). Older linkers ignore the option
//! with a warning; README, "Benchmarks", has what it saves at rest.
//!
//! Not position-independent (`-no-pie`): packed or not, the relocations
//! still *write* every pointer of the read-only data at start (vtables,
//! tables of strings: `.data.rel.ro`, 1.6 MB here), so each of those pages
//! became a private, dirty copy for the process's life (1.7 MiB of the idle
//! daemon's 16 MiB). Linked at a fixed address, the pointers are final in
//! the file: those pages are shared with the page cache, and resident only
//! where read. The cost: the executable's own image is not randomized
//! (its libraries, heap, stacks and mappings still are); pollhook is
//! safe Rust (its `unsafe` is three libc calls), parses what it receives
//! with safe parsers only, and runs in the systemd unit's sandbox. `POLLHOOK_PIE=1` at build time keeps
//! a position-independent executable. ARCHITECTURE.md, "Dependencies
//! worth knowing", has the trade.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=POLLHOOK_PIE");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ENV") == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
        if var("POLLHOOK_PIE") != "1" {
            println!("cargo:rustc-link-arg-bins=-no-pie");
        }
    }
}
