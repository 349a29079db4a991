//! Giving freed heap memory back to the system after a load.
//!
//! glibc's allocator keeps what a burst of connections freed in its per-thread arenas: a node
//! that peaked at 65 MiB under 500 connections stayed there long after the load (11 MiB idle).
//! Pages inside an arena are only returned by `malloc_trim`, so a node checks every
//! [`TRIM_INTERVAL`] how much free memory the allocator holds and, above [`TRIM_FREE_BYTES`],
//! trims. Under steady load freed memory is reused before it builds up, so trimming is rare
//! there; after a load it happens once.
//!
//! glibc also makes up to eight arenas per core, one per thread that contends, and each keeps
//! its own free memory; [`limit_arenas`] caps them at one per core, as jemalloc sizes its own,
//! so that less is held apart after a load.
//!
//! Other allocators (musl, or a non-Linux target) return memory their own way; there this module
//! does nothing.

use std::time::Duration;

/// How often the allocator's free memory is looked at.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(2);
/// Free bytes held by the allocator above which it is trimmed.
pub const TRIM_FREE_BYTES: usize = 8 * 1024 * 1024;

/// Bytes the allocator holds free (not handed out, not returned), when it can tell.
pub fn free_bytes() -> Option<usize> {
    imp::free_bytes()
}

/// Caps the allocator's arenas at one per core (at least two). Call before starting threads.
pub fn limit_arenas() {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    imp::limit_arenas(cores.max(2));
}

/// Returns the allocator's free pages to the system now. Whether anything was returned.
pub fn trim() -> bool {
    imp::trim()
}

/// Trims whenever more than [`TRIM_FREE_BYTES`] are held free, checking every
/// [`TRIM_INTERVAL`]. Runs until the runtime stops.
pub async fn return_freed_memory() {
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(free) = free_bytes() else {
            return;
        };
        if free > TRIM_FREE_BYTES {
            // The walk over the arenas takes the allocator's locks: keep it off the workers.
            let released = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
            tracing::debug!(free, released, "returned freed heap memory to the system");
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod imp {
    pub fn free_bytes() -> Option<usize> {
        // SAFETY: mallinfo2 takes no arguments and only reads the allocator's own statistics
        // under its locks; it is safe to call from any thread at any time.
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks)
    }

    pub fn limit_arenas(n: usize) {
        let n = libc::c_int::try_from(n).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a tunable of the allocator under its lock; M_ARENA_MAX
        // limits arenas made from now on and is safe to set at any time.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, n);
        }
    }

    pub fn trim() -> bool {
        // SAFETY: malloc_trim only releases pages the allocator holds free, under its locks;
        // it is safe to call from any thread at any time.
        unsafe { libc::malloc_trim(0) == 1 }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn free_bytes() -> Option<usize> {
        None
    }

    pub fn limit_arenas(_: usize) {}

    pub fn trim() -> bool {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rss_bytes() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    /// What a burst of connections leaves behind: many small blocks freed on several threads,
    /// with a few still held, so no arena can shrink from its top by itself.
    #[test]
    fn memory_freed_inside_the_arenas_goes_back_to_the_system() {
        const THREADS: usize = 4;
        const BLOCKS: usize = 32 * 1024; // 1 KiB each: 32 MiB per thread.
        let (keep_tx, keep_rx) = std::sync::mpsc::channel();
        let before = rss_bytes();
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                let keep_tx = keep_tx.clone();
                s.spawn(move || {
                    let mut blocks: Vec<Vec<u8>> =
                        (0..BLOCKS).map(|i| vec![i as u8; 1024]).collect();
                    // One block in 64 stays alive: a pin every 64 KiB.
                    let kept: Vec<Vec<u8>> =
                        blocks.iter_mut().step_by(64).map(std::mem::take).collect();
                    drop(blocks);
                    keep_tx.send(kept).unwrap();
                });
            }
        });
        drop(keep_tx);
        let kept: Vec<Vec<Vec<u8>>> = keep_rx.iter().collect();
        let loaded = rss_bytes();
        assert!(
            loaded > before + 64 * 1024 * 1024,
            "the blocks stay resident after free: {before} -> {loaded}"
        );
        assert!(
            free_bytes().unwrap() > TRIM_FREE_BYTES,
            "the allocator holds them"
        );
        assert!(trim());
        let trimmed = rss_bytes();
        assert!(
            trimmed < loaded - 64 * 1024 * 1024,
            "trimming returns most of them: {loaded} -> {trimmed}"
        );
        assert!(
            kept.iter().flatten().all(|b| b.len() == 1024),
            "the kept blocks are intact"
        );
    }
}
