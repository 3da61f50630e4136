//! Makes the fork server's read-only program image (its executable's code and constants)
//! resident in anonymous memory, so that the processes it forks inherit it mapped.
//!
//! `fork()` copies the page tables of anonymous memory but not those of file mappings: a forked
//! child faults in again every page of code and read-only data it touches, each fault mapping
//! a small window of the page cache. For a test binary (tens of megabytes when built
//! unoptimised) that is a hundred or more faults per test, most of a forked test's cost. So
//! the server, once, reads each read-only mapping of its executable from the file into
//! anonymous memory (on huge pages where the range allows) and moves the copy over the
//! original, at the same address, with the same protection and the same bytes. Its children
//! start with all of it mapped, through a few huge-page entries per fork. The server does this
//! in unoptimised builds only (where code is spread over many pages); see `forkserver::serve`.
//!
//! Only mappings that hold the file's bytes unchanged are copied (none of their pages written,
//! as relocated read-only data has been); the shared libraries are left alone (measured: for
//! them, copying a few megabytes of small pages per fork costs more than the faults it saves).
//! The swap is one `mremap(2)` per mapping in a process with one thread: code running from a
//! mapping while it is replaced goes on running, since the bytes at every address are the
//! same. A step that fails leaves that mapping as it was. What differs for the forked
//! processes: `/proc/self/maps` shows those ranges as anonymous, so a profiler that symbolises
//! through the maps file sees no file there (the program's own backtraces read the executable
//! and are unaffected).

use std::ffi::c_void;
use std::fs::File;
use std::os::unix::fs::FileExt;

use nix::libc;

/// The size of a huge page on the platforms with a fork server.
const HUGE_PAGE: usize = 2 << 20;

/// The largest image copied: past it the copy would cost more memory than the faults it saves
/// are worth.
const MAX_RESIDENT: usize = 512 << 20;

/// A read-only mapping of the executable, as `/proc/self/smaps` lists it.
#[derive(Debug, PartialEq)]
struct Mapping {
    start: usize,
    end: usize,
    /// Where in the file it starts.
    offset: u64,
    prot: libc::c_int,
}

/// The read-only (`r--p`, `r-xp`) mappings of `exe` that still hold the file's bytes (no
/// anonymous pages), from the text of `/proc/self/smaps`.
fn unchanged_read_only_mappings(smaps: &str, exe: &str) -> Vec<Mapping> {
    let mut found = Vec::new();
    // The mapping whose fields are being read, if it is a candidate.
    let mut current: Option<Mapping> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if first.ends_with(':') {
            // A field of the mapping above.
            if first == "Anonymous:" {
                if let Some(mapping) = current.take() {
                    if fields.next() == Some("0") {
                        found.push(mapping);
                    }
                }
            }
            continue;
        }
        // A mapping's header: range, perms, offset, device, inode, path (may hold spaces).
        current = None;
        let (Some(perms), Some(offset)) = (fields.next(), fields.next()) else {
            continue;
        };
        let path = fields.skip(2).collect::<Vec<_>>().join(" ");
        let prot = match perms {
            "r--p" => libc::PROT_READ,
            "r-xp" => libc::PROT_READ | libc::PROT_EXEC,
            _ => continue,
        };
        if path != exe {
            continue;
        }
        let Some((start, end)) = first.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(offset)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
            u64::from_str_radix(offset, 16),
        ) else {
            continue;
        };
        if end > start {
            current = Some(Mapping {
                start,
                end,
                offset,
                prot,
            });
        }
    }
    found
}

/// Replaces the unchanged read-only mappings of this program's executable with anonymous
/// copies. Returns how many bytes moved; an error says what failed (the mappings not yet
/// replaced stay as they were).
///
/// # Safety
/// The process must have one thread (nothing else may run code from a mapping while it is
/// swapped).
pub unsafe fn make_resident() -> Result<usize, String> {
    let exe_path = std::fs::read_link("/proc/self/exe")
        .map_err(|e| format!("cannot read /proc/self/exe: {e}"))?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")
        .map_err(|e| format!("cannot read /proc/self/smaps: {e}"))?;
    let mappings = unchanged_read_only_mappings(&smaps, &exe_path.to_string_lossy());
    let total: usize = mappings.iter().map(|m| m.end - m.start).sum();
    if total > MAX_RESIDENT {
        return Err(format!(
            "the program's image is too large to copy ({total} bytes)"
        ));
    }
    // The mapped file itself, whatever its path names now.
    let exe = File::open("/proc/self/exe")
        .map_err(|e| format!("cannot open {}: {e}", exe_path.display()))?;
    let mut moved = 0;
    for mapping in mappings {
        // SAFETY: the caller guarantees a single thread; `mapping` is a live mapping of this
        // process holding the bytes of `exe` at its offset, read from the maps just now.
        unsafe { replace(&mapping, &exe)? };
        moved += mapping.end - mapping.start;
    }
    Ok(moved)
}

/// Reads `mapping`'s bytes from `exe` into fresh anonymous memory and moves that over it.
///
/// # Safety
/// As [`make_resident`]; `mapping` must be a mapping of this process that holds `exe`'s bytes
/// from its offset.
unsafe fn replace(mapping: &Mapping, exe: &File) -> Result<(), String> {
    let len = mapping.end - mapping.start;
    let at = mapping.start as *mut c_void;
    // A range with the target's alignment within a huge page, so huge pages made here stay
    // huge when moved: reserve a huge page more, and trim.
    let reserve = len + HUGE_PAGE;
    // SAFETY: a new private anonymous mapping; nothing else refers to it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let base = base as usize;
    let want = mapping.start % HUGE_PAGE;
    let copy = base + (want + HUGE_PAGE - base % HUGE_PAGE) % HUGE_PAGE;
    // SAFETY: both trimmed pieces lie within the reservation made above and outside the copy.
    unsafe {
        if copy > base {
            libc::munmap(base as *mut c_void, copy - base);
        }
        let tail = copy + len;
        if base + reserve > tail {
            libc::munmap(tail as *mut c_void, base + reserve - tail);
        }
    }
    let copy = copy as *mut c_void;
    let undo = |what: String| {
        // SAFETY: `copy` is the mapping made above, of `len` bytes, not moved.
        unsafe { libc::munmap(copy, len) };
        Err(what)
    };
    // Advice only: without huge pages the copy is made of small ones.
    // SAFETY: madvise(2) on the mapping made above.
    unsafe { libc::madvise(copy, len, libc::MADV_HUGEPAGE) };
    // SAFETY: `copy` is `len` writable bytes that nothing else refers to.
    let bytes = unsafe { std::slice::from_raw_parts_mut(copy as *mut u8, len) };
    // The part of a last page past the file's end reads as zeros, as the mapping shows it.
    let mut done = 0;
    while done < len {
        match exe.read_at(&mut bytes[done..], mapping.offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return undo(format!("cannot read the executable: {e}")),
        }
    }
    // SAFETY: `copy` is the mapping made above.
    if unsafe { libc::mprotect(copy, len, mapping.prot) } != 0 {
        return undo(format!("mprotect: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: moves the copy over the original in one call: the bytes at every address stay
    // the same, and with one thread nothing runs from the range meanwhile but this call.
    let moved = unsafe {
        libc::mremap(
            copy,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            at,
        )
    };
    if moved == libc::MAP_FAILED {
        return undo(format!("mremap: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_executables_unchanged_read_only_mappings_are_chosen() {
        let smaps = "\
55d0c0000000-55d0c0400000 r--p 00000000 fe:01 123 /work/bin/my test
Size:               4096 kB
Anonymous:             0 kB
55d0c0400000-55d0c0d00000 r-xp 00400000 fe:01 123 /work/bin/my test
Rss:                 100 kB
Anonymous:             0 kB
55d0c0d00000-55d0c0d10000 r--p 00d00000 fe:01 123 /work/bin/my test
Anonymous:            64 kB
55d0c0d10000-55d0c0e00000 rw-p 00d10000 fe:01 123 /work/bin/my test
Anonymous:             8 kB
55d0c1000000-55d0c1100000 rw-p 00000000 00:00 0 [heap]
Anonymous:          1024 kB
7f0000000000-7f0000200000 r-xp 00000000 fe:01 456 /usr/lib/libc.so.6
Anonymous:             0 kB
7f0000300000-7f0000300000 r--p 00000000 fe:01 123 /work/bin/my test
Anonymous:             0 kB
";
        let found = unchanged_read_only_mappings(smaps, "/work/bin/my test");
        assert_eq!(
            found,
            vec![
                Mapping {
                    start: 0x55d0c0000000,
                    end: 0x55d0c0400000,
                    offset: 0,
                    prot: libc::PROT_READ
                },
                Mapping {
                    start: 0x55d0c0400000,
                    end: 0x55d0c0d00000,
                    offset: 0x400000,
                    prot: libc::PROT_READ | libc::PROT_EXEC
                },
            ]
        );
    }

    #[test]
    fn a_mapping_of_this_test_binary_is_replaced_by_the_same_bytes() {
        // This unit test binary's own image, swapped in a child process (the swap needs a
        // single thread, which a forked child of the test harness has).
        // SAFETY: the child only makes the swap, calls a function from the swapped code and
        // exits without returning.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                // SAFETY: a forked child has one thread.
                let code = match unsafe { make_resident() } {
                    Ok(moved) if moved > 0 => {
                        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
                        let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
                        let left = unchanged_read_only_mappings(&smaps, &exe.to_string_lossy());
                        // Code still runs from the copy, and no file mapping of it is left.
                        if left.is_empty() && std::hint::black_box(mix(3)) == 10 {
                            0
                        } else {
                            2
                        }
                    }
                    _ => 3,
                };
                // SAFETY: _exit(2) ends the child without running the parent's handlers.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).expect("waitpid");
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }

    #[inline(never)]
    fn mix(x: u64) -> u64 {
        x * 3 + 1
    }
}
