//! Link options for the `tollgate` executable only (dependencies are compiled as before, so
//! this costs a build nothing).
//!
//! `-z pack-relative-relocs` stores the executable's relative relocations in the compact
//! `DT_RELR` form (glibc 2.36 and later; Debian 12 has it). A position-independent executable of
//! this size otherwise carries 4.4 MB of `R_X86_64_RELATIVE` entries that the loader reads once
//! at start-up and that stay resident as the binary's pages for the life of the process:
//! with 100,001 consumers, 4.5 of the 57 MB the process held after a load (BENCHMARKS.md, "The
//! executable's relocations packed"). The executable stays position-independent, so it is placed at a random address as
//! before. A linker that does not know the option ignores it with a warning, and GNU ld falls
//! back to ordinary relocations when the C library does not support the packed form.
//!
//! What it costs: an executable linked this way needs glibc 2.36 or later where it runs (it
//! names the `GLIBC_ABI_DT_RELR` version); built on Debian 12 without it, it needed 2.35. To
//! build for an older system than the one building, set `TOLLGATE_PACKED_RELOCS=0`.
fn main() {
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let wanted = std::env::var("TOLLGATE_PACKED_RELOCS").as_deref() != Ok("0");
    if target_os == "linux" && target_env == "gnu" && wanted {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=TOLLGATE_PACKED_RELOCS");
}
