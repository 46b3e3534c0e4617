//! Asking for cache lines before writing them (`PREFETCHW`).
//!
//! Why: a worker encodes each request's event into a buffer that was last read on another
//! core. The publisher copied it into the log there, and gave it back emptied (`events.rs`).
//! Each of the event's seven or eight cache lines is then in the other core's cache, and the
//! worker's first store to it waits for the line to be taken from there. The stores themselves
//! queue, but the next locked instruction (the buffer's mutex, a task's state) waits for all of
//! them: under load two thirds of the encoder's samples sat at that instruction (`perf
//! annotate`). A write prefetch of the next event's lines, issued right after an event is
//! written, has the lines on the worker's core by the time the next request ends: the
//! encoder's share of a worker's samples went from 2.5 % to 1.4 %, about 0.15 µs a request
//! (BENCHMARKS.md, twenty-fifth round). It is a hint: it never faults and changes nothing the
//! program can observe, so a region that is not written after all costs only the hint.
//!
//! The instruction has no stable intrinsic (the `prfchw` target feature is unstable, and
//! `_mm_prefetch` with `_MM_HINT_ET0` compiles to a read prefetch without it), so it is one
//! line of inline assembly: the crate's only `unsafe`. It runs only where the CPU says it has
//! it (CPUID leaf `0x8000_0001`, ECX bit 8: every x86-64 CPU from AMD, and Intel's since
//! Broadwell); elsewhere, and on other architectures, [`for_write`] does nothing.

/// Hints that the cache lines of `region` are about to be written, so that they are fetched for
/// this core now rather than at the first store.
pub(crate) fn for_write<T>(region: &[T]) {
    #[cfg(target_arch = "x86_64")]
    if x86::has_prefetchw() && !region.is_empty() {
        // Every line the region touches, from the one holding its first byte.
        let start = region.as_ptr().cast::<u8>();
        let misalign = start as usize % LINE;
        let first = start.wrapping_sub(misalign);
        let span = misalign + std::mem::size_of_val(region);
        let mut at = 0;
        while at < span {
            x86::prefetchw(first.wrapping_add(at));
            at += LINE;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = region;
}

/// A cache line on the CPUs this is for.
const LINE: usize = 64;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::sync::LazyLock;

    /// Whether the CPU has `PREFETCHW` (AMD's 3DNowPrefetch bit, which Intel's CPUs set too).
    pub(super) fn has_prefetchw() -> bool {
        static HAS: LazyLock<bool> = LazyLock::new(|| {
            use std::arch::x86_64::__cpuid;
            __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 8) != 0
        });
        *HAS
    }

    /// `PREFETCHW` of the line holding `p`.
    #[inline(always)]
    pub(super) fn prefetchw(p: *const u8) {
        // SAFETY: a prefetch is a hint. It reads and writes nothing the program can observe
        // and does not fault, whatever `p` is; it is only issued on CPUs that have it.
        #[allow(unsafe_code)]
        unsafe {
            std::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, preserves_flags, readonly));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_region_can_be_hinted_and_nothing_changes() {
        let buf: Vec<u8> = (0..=255).cycle().take(4 * LINE + 7).collect();
        let before = buf.clone();
        for start in [0, 1, 63, 64, 65] {
            for len in [0, 1, 63, 64, 65, 130, buf.len() - start] {
                for_write(&buf[start..(start + len).min(buf.len())]);
            }
        }
        assert_eq!(buf, before);
        let mut spans: Vec<(usize, usize, usize)> = Vec::with_capacity(10);
        for_write(spans.spare_capacity_mut());
        for_write(&[(); 3]);
        spans.push((1, 2, 3));
        assert_eq!(spans, [(1, 2, 3)]);
    }
}
