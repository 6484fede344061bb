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
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ENV") == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
